"""The static embedder is distilled offline from the packaged MiniLM, cached, and served
without torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from workers.config import Settings
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.static_embedder import StaticEmbedder, ensure_model, model_dir

# Distil only the ~160 word pieces that start with "th": the real build path on a
# vocabulary small enough for a test (the whole one takes 15 s to minutes here).
FEW_PIECES = r"^(?!th)"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = model_dir(tmp_path_factory.mktemp("embedders"), pca_dims=8)
    started = time.monotonic()
    ensure_model(folder, pca_dims=8, token_remove_pattern=FEW_PIECES)
    print(f"distilled {folder.name} in {time.monotonic() - started:.1f}s")
    return folder


def test_it_is_distilled_offline_from_the_packaged_model(
    small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = StaticEmbedder(small_model)
    vectors = embedder.embed(["the theory of them", "", "that thing there"])
    assert vectors.shape == (3, 8) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-3)
    assert embedder.name.startswith("static-all-MiniLM-L6-v2-pca8@")


def test_a_cached_model_is_not_distilled_again(small_model: Path) -> None:
    weights = small_model / "model.safetensors"
    built = weights.stat().st_mtime_ns
    # A pattern that removes every piece would fail if it were distilled again.
    ensure_model(small_model, pca_dims=8, token_remove_pattern=".*")
    assert weights.stat().st_mtime_ns == built


def test_serving_it_imports_neither_torch_nor_sentence_transformers(small_model: Path) -> None:
    """The router's memory target rests on this: torch alone is ~400 MB resident."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from workers.routing.static_embedder import StaticEmbedder\n"
        f"StaticEmbedder(Path({str(small_model)!r})).embed(['the theory'])\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


# Texts that reach every branch model2vec's encode has: empty and blank texts, pieces
# the vocabulary lacks (dropped), a text of more than max_length pieces (truncated),
# prompts longer than the focus, accents, CJK, emoji, control characters, literal
# special tokens, repeated texts.
VARIED_TEXTS = [
    "",
    " \t\n",
    "What is the capital of France?",
    "the theory of them, that thing there",
    "naïve café, Ünïcödé résumé",
    "東京は日本の首都です。北京は中国の首都です。",
    "🙂🙂 hello 🙂 world \u200b\u0000\x07",
    "[PAD] [UNK] [CLS] [pad] tokens as text",
    "a," * 600,  # 1,200 pieces: past max_length
    "Question: " + "word " * 400 + "final question here?",  # past the focus
    "x" * 5000,
    "print(f'{x!r}')  # code\n\tif a <= b: return {'k': [1, 2, 3]}",
    "What is the capital of France?",
]


def model2vec_vectors(folder: Path, texts: list[str]) -> np.ndarray:
    """What model2vec's own encode gives for the embedder's input."""
    from model2vec import StaticModel

    from workers.routing.embedder import query_focus

    model = StaticModel.from_pretrained(str(folder))
    return model.encode([query_focus(t) for t in texts], use_multiprocessing=False)


def assert_pools_as_model2vec(folder: Path) -> None:
    embedder = StaticEmbedder(folder)
    rng = np.random.default_rng(0)
    texts = (
        VARIED_TEXTS
        + [t[::-1] for t in VARIED_TEXTS]
        + [" ".join(rng.choice(VARIED_TEXTS[2:8], size=3)) for _ in range(40)]
    )
    # Real prompts, whole and as short queries: long sums, where the order in which
    # float16 pieces are added shows in the rounded mean.
    prompts = load_routerbench(shipped_sample_path()).prompts
    texts += prompts + [p[-160:] for p in prompts]
    expected = model2vec_vectors(folder, texts)
    pooled = embedder.pool(embedder.tokenize(texts))
    assert pooled.dtype == expected.dtype
    np.testing.assert_array_equal(pooled, expected)  # to the bit, float16 rounding too
    one_by_one = np.concatenate([embedder.pool(embedder.tokenize([t])) for t in texts])
    np.testing.assert_array_equal(one_by_one, expected)
    vectors = embedder.embed(texts)
    wide = expected.astype(np.float32)
    unit = wide / np.maximum(np.linalg.norm(wide, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(vectors, unit)
    assert not vectors[0].any()  # an empty text: zeros, as model2vec gives


def test_it_pools_as_model2vec_encodes_on_a_small_vocabulary(small_model: Path) -> None:
    """Most pieces are unknown to the small model: dropped, many texts empty."""
    assert_pools_as_model2vec(small_model)


def test_it_pools_as_model2vec_encodes_with_the_served_model() -> None:
    folder = model_dir(Path(Settings().embedder_cache_dir))
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"no distilled model in {folder} (make builds it)")
    assert_pools_as_model2vec(folder)


def test_it_pools_as_model2vec_encodes_with_weights_a_token_mapping_and_no_normalising(
    small_model: Path, tmp_path: Path
) -> None:
    """model2vec's other path (vocabulary-quantised models): rows shared through a
    mapping, each piece weighted, means left unnormalised."""
    from model2vec import StaticModel

    small = StaticModel.from_pretrained(str(small_model))
    rng = np.random.default_rng(1)
    pieces = len(small.tokens)
    StaticModel(
        vectors=small.embedding[: pieces // 2],
        tokenizer=small.tokenizer,
        normalize=False,
        weights=rng.uniform(0.1, 2.0, pieces).astype(np.float32),
        token_mapping=rng.integers(0, pieces // 2, pieces),
    ).save_pretrained(str(tmp_path))
    reloaded = StaticModel.from_pretrained(str(tmp_path))
    assert reloaded.weights is not None and reloaded.token_mapping is not None
    assert not reloaded.normalize
    assert_pools_as_model2vec(tmp_path)
