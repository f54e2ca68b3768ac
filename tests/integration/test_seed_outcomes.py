"""Warm starts from a generic file (one row per prompt and model) into real PostgreSQL,
through the seeding code and through the `omnirouter seed-outcomes` command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from schemas import Outcome
from workers.config import OUTCOME_RESPONSE_CHARS
from workers.db.models import OutcomeRow
from workers.db.repository import upsert_outcomes
from workers.routing.dataset import (
    load_outcome_rows,
    load_routerbench,
    shipped_sample_path,
    text_prompt_id,
)
from workers.stream.model_worker import response_excerpt
from workers.stream.replay import seed_outcomes, seed_records

pytestmark = pytest.mark.integration

GPT4, CLAUDE, MISTRAL = "gpt-4-1106-preview", "claude-v2", "mistralai/mistral-7b-chat"


class FakeEmbedder:
    """Fixed-dimension vectors from a hash of the text; remembers what it was asked."""

    name = "fake"
    dimension = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        self.calls.append(list(texts))
        rows = [
            np.frombuffer(hashlib.sha256(t.encode()).digest()[: self.dimension], np.uint8)
            for t in texts
        ]
        vectors = np.array(rows, dtype=np.float32).reshape(len(texts), self.dimension) + 1
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def stored(engine: sa.Engine) -> dict[tuple[str, str], OutcomeRow]:
    with Session(engine) as session:
        return {(r.query_id, r.model): r for r in session.scalars(sa.select(OutcomeRow))}


def vector(row: OutcomeRow) -> NDArray[np.float32]:
    assert row.embedding is not None
    return np.frombuffer(row.embedding, np.float32)


def generic_rows(path: Path) -> Path:
    rows = [
        {"prompt_id": "p1", "text": "What is 2+2?", "model": GPT4, "score": 1, "cost": 0.003,
         "tokens": 5},
        {"prompt_id": "p1", "text": "What is 2+2?", "model": CLAUDE, "score": 0.5, "cost": None,
         "tokens": 7},
        {"text": "Name a prime.", "model": GPT4, "score": None, "cost": 0.002, "tokens": None},
        {"text": "Name a prime.", "model": MISTRAL, "score": 0, "cost": 0.0001, "tokens": 3},
        {"text": "Name a prime.", "model": CLAUDE},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_generic_file_is_stored_with_one_embedding_per_prompt(
    postgres_engine: sa.Engine, tmp_path: Path
) -> None:
    embedder = FakeEmbedder()
    records = load_outcome_rows(generic_rows(tmp_path / "evals.jsonl"))
    assert seed_records(postgres_engine, records, embedder) == 5

    assert embedder.calls == [["What is 2+2?", "Name a prime."]]  # each text once
    rows = stored(postgres_engine)
    prime = f"seed-{text_prompt_id('Name a prime.')}"
    assert set(rows) == {
        ("seed-p1", GPT4), ("seed-p1", CLAUDE), (prime, GPT4), (prime, MISTRAL), (prime, CLAUDE)
    }  # fmt: skip
    facts = {
        key: (r.quality_score, r.score_source, r.cost_usd, r.output_tokens)
        for key, r in rows.items()
    }
    assert facts == {
        ("seed-p1", GPT4): (1.0, "replay", pytest.approx(0.003), 5),
        ("seed-p1", CLAUDE): (0.5, "replay", None, 7),
        (prime, GPT4): (None, None, pytest.approx(0.002), None),
        (prime, MISTRAL): (0.0, "replay", pytest.approx(0.0001), 3),
        (prime, CLAUDE): (None, None, None, None),
    }
    assert {r.pool for r in rows.values()} == {"default"}
    expected = dict(
        zip(["seed-p1", prime], embedder.embed(["What is 2+2?", "Name a prime."]), strict=True)
    )
    for (query_id, _), row in rows.items():
        np.testing.assert_array_equal(vector(row), expected[query_id])
    distinct = {vector(r).tobytes() for r in rows.values()}
    assert len(distinct) == 2


def test_seeding_again_replaces_seeded_scores_and_a_judge_does_not(
    postgres_engine: sa.Engine, tmp_path: Path
) -> None:
    path = generic_rows(tmp_path / "evals.jsonl")
    seed_records(postgres_engine, load_outcome_rows(path), FakeEmbedder())
    judge = Outcome(query_id="seed-p1", model=GPT4, quality_score=0.0, source="judge")
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [judge], [None])
    assert stored(postgres_engine)[("seed-p1", GPT4)].quality_score == 1.0

    path.write_text(path.read_text().replace('"score": 1,', '"score": 0.75,'))
    seed_records(postgres_engine, load_outcome_rows(path), FakeEmbedder())
    row = stored(postgres_engine)[("seed-p1", GPT4)]
    assert (row.quality_score, row.score_source) == (0.75, "replay")

    user = Outcome(query_id="seed-p1", model=GPT4, quality_score=0.25, source="user")
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [user], [None])
    row = stored(postgres_engine)[("seed-p1", GPT4)]
    assert (row.quality_score, row.score_source, row.output_tokens) == (0.25, "user", 5)


def test_routerbench_seeding_takes_the_same_path(postgres_engine: sa.Engine) -> None:
    table = load_routerbench(shipped_sample_path()).take([0, 1, 2])
    embedder = FakeEmbedder()
    assert seed_outcomes(postgres_engine, table, embedder) == 3 * len(table.models)
    assert embedder.calls == [table.prompts]
    rows = stored(postgres_engine)
    assert {q for q, _ in rows} == {f"seed-{s}" for s in table.sample_ids}
    column = table.models.index(GPT4)
    first = rows[(f"seed-{table.sample_ids[0]}", GPT4)]
    assert first.quality_score == table.scores[0, column]
    assert first.cost_usd == pytest.approx(table.costs[0, column])
    assert {r.score_source for r in rows.values() if r.quality_score is not None} == {"replay"}
    assert len({vector(r).tobytes() for r in rows.values()}) == 3
    recorded = table.responses[0][GPT4]
    assert recorded and first.response_excerpt == response_excerpt(recorded, OUTCOME_RESPONSE_CHARS)


def omnirouter(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("omnirouter")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "workers.cli"]
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_seed_command_stores_a_generic_csv(postgres_url: str, tmp_path: Path) -> None:
    path = tmp_path / "evals.csv"
    path.write_text(
        "prompt_id,text,model,score,cost,tokens\n"
        f"a,What is the capital of France?,{GPT4},1,0.004,9\n"
        f"a,What is the capital of France?,{MISTRAL},0,0.0002,40\n"
        f"b,Write a haiku about rain.,{CLAUDE},0.8,,\n"
        f"b,Write a haiku about rain.,gpt-9,1,,\n"
        f'c,"Sum 1..10, please.",{GPT4},,0.001,\n'
    )
    env = {**os.environ, "DATABASE_URL": postgres_url}
    env.pop("ROUTER_MODELS", None)
    engine = sa.create_engine(postgres_url)

    refused = omnirouter(["seed-outcomes", "--data", str(path)], env)
    assert refused.returncode != 0
    assert "models not in ROUTER_MODELS: gpt-9 (1 row)" in refused.stderr
    assert "--skip-unknown-models" in refused.stderr
    assert stored(engine) == {}

    result = omnirouter(
        ["seed-outcomes", "--data", str(path), "--limit", "2", "--skip-unknown-models"], env
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "skipped the rows of models not in ROUTER_MODELS: gpt-9 (1 row)" in result.stdout
    assert "stored 3 outcomes of 2 prompts" in result.stdout
    rows = stored(engine)
    assert set(rows) == {("seed-a", GPT4), ("seed-a", MISTRAL), ("seed-b", CLAUDE)}
    a4 = rows[("seed-a", GPT4)]
    assert (a4.quality_score, a4.score_source, a4.output_tokens) == (1.0, "replay", 9)
    assert a4.cost_usd == pytest.approx(0.004)
    assert rows[("seed-b", CLAUDE)].quality_score == pytest.approx(0.8)
    # ROUTER_EMBEDDER's default: the static embedder, 256 dimensions, named on the row.
    assert vector(a4).shape == (256,)
    assert (a4.embedder or "").startswith("static-all-MiniLM-L6-v2-pca256@")
    np.testing.assert_array_equal(vector(a4), vector(rows[("seed-a", MISTRAL)]))
    assert np.linalg.norm(vector(a4)) == pytest.approx(1.0, abs=1e-5)

    bad = tmp_path / "bad.csv"
    bad.write_text(f"text,model,score\nhello,{GPT4},2\n")
    refused = omnirouter(["seed-outcomes", "--data", str(bad)], env)
    assert refused.returncode != 0
    assert f"{bad}:2: score 2 is outside [0, 1]" in refused.stderr
    engine.dispose()


def test_the_seed_command_keeps_responses_to_outcome_response_max_chars(
    postgres_url: str, tmp_path: Path
) -> None:
    """The command stored 2,000 characters of each response whatever the setting."""
    path = tmp_path / "evals.jsonl"
    row = {"prompt_id": "a", "text": "Count.", "model": GPT4, "score": 1, "response": "x" * 5000}
    path.write_text(json.dumps(row) + "\n")
    env = {**os.environ, "DATABASE_URL": postgres_url, "OUTCOME_RESPONSE_MAX_CHARS": "100"}
    env.pop("ROUTER_MODELS", None)
    result = omnirouter(["seed-outcomes", "--data", str(path)], env)
    assert result.returncode == 0, result.stderr
    excerpt = stored(sa.create_engine(postgres_url))[("seed-a", GPT4)].response_excerpt
    assert excerpt == response_excerpt("x" * 5000, 100)
