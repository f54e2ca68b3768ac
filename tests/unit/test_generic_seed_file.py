"""Generic warm-start files (one row per prompt and model): parsing, errors, format detection."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workers.routing.dataset import (
    DatasetError,
    RecordedOutcome,
    detect_format,
    first_prompts,
    load_outcome_rows,
    load_seed_file,
    shipped_sample_path,
    split_known_models,
    stored_prompt_ids,
    text_prompt_id,
)


def at(path: Path, line: int) -> str:
    """The start of an error message naming this line of this file."""
    return f"^{re.escape(str(path))}:{line}: "


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_json_lines_are_read_with_nulls_and_prompts_grouped_by_text(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "evals.jsonl",
        [
            {"text": "2+2?", "model": "a", "score": 1, "cost": 0.002, "tokens": 12},
            {"text": "2+2?", "model": "b", "score": None, "cost": None, "tokens": None},
            {"text": "Name a colour.", "model": "a", "score": 0.25, "prompt_id": 7},
            {"text": "Capital of France?", "model": "a"},  # score, cost, tokens absent
        ],
    )
    rows = load_outcome_rows(path)
    assert rows == [
        RecordedOutcome(text_prompt_id("2+2?"), "2+2?", "a", 1.0, 0.002, 12),
        RecordedOutcome(text_prompt_id("2+2?"), "2+2?", "b", None, None, None),
        RecordedOutcome("7", "Name a colour.", "a", 0.25, None, None),
        RecordedOutcome(
            text_prompt_id("Capital of France?"), "Capital of France?", "a", None, None, None
        ),
    ]
    assert text_prompt_id("2+2?") == text_prompt_id("2+2?") != text_prompt_id("2+3?")


def test_csv_is_read_by_its_header_with_empty_cells_as_null(tmp_path: Path) -> None:
    path = tmp_path / "evals.csv"
    path.write_text(
        "\ufeffmodel,text,score,cost,tokens,prompt_id,notes\n"  # any order; BOM, extras
        'a,"Say ""hi"", twice",1,0.5,3,p1,ok\n'
        'b,"Say ""hi"", twice",,,,p1,\n'
        "\n"
        'a,"two\nlines",0,0,0,,\n',
        encoding="utf-8",
    )
    assert load_outcome_rows(path) == [
        RecordedOutcome("p1", 'Say "hi", twice', "a", 1.0, 0.5, 3),
        RecordedOutcome("p1", 'Say "hi", twice', "b", None, None, None),
        RecordedOutcome(text_prompt_id("two\nlines"), "two\nlines", "a", 0.0, 0.0, 0),
    ]


GOOD = {"text": "q", "model": "a", "score": 0.5, "cost": 0.1, "tokens": 4}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"model": "a"}, "text is missing or empty"),
        ({"text": "", "model": "a"}, "text is missing or empty"),
        ({"text": 3, "model": "a"}, "text is not a string"),
        ({"text": "q"}, "model is missing or empty"),
        ({**GOOD, "score": 1.5}, "score 1.5 is outside [0, 1]"),
        ({**GOOD, "score": -0.1}, "score -0.1 is outside [0, 1]"),
        ({**GOOD, "score": "high"}, "score is not a number: 'high'"),
        ({**GOOD, "score": True}, "score is not a number: True"),
        ({**GOOD, "cost": -1}, "cost -1 is negative"),
        ({**GOOD, "cost": [1]}, "cost is not a number"),
        ({**GOOD, "tokens": -2}, "tokens -2 is not a whole number >= 0"),
        ({**GOOD, "tokens": 2.5}, "tokens 2.5 is not a whole number >= 0"),
        ({**GOOD, "prompt_id": "x" * 181}, "prompt_id is longer than 180"),
        ({**GOOD, "prompt_id": 1.5}, "prompt_id is not a string"),
        # Values the store or the tokenizer refuses: the command stopped on an
        # uncaught DataError or TypeError, without the file or the line.
        ({**GOOD, "tokens": 3_000_000_000}, "tokens 3e+09 is more than 2147483647"),
        ({**GOOD, "tokens": 10**400}, "tokens is not a finite number"),
        ({**GOOD, "text": "a \x00 b"}, "text holds a NUL character"),
        ({**GOOD, "prompt_id": "x\x00y"}, "prompt_id holds a NUL character"),
        ({**GOOD, "response": "\x00"}, "response holds a NUL character"),
        ({**GOOD, "text": "a \ud800 b"}, "text holds a lone surrogate at character 2"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_every_bad_json_row_is_named_by_its_line(tmp_path: Path, bad: object, message: str) -> None:
    path = write_jsonl(tmp_path / "evals.jsonl", [GOOD | {"model": "z"}, bad])
    with pytest.raises(DatasetError) as caught:
        load_outcome_rows(path)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert message in str(caught.value)


def test_json_that_does_not_parse_and_non_finite_numbers_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "evals.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"text": "q", "model":\n')
    with pytest.raises(DatasetError, match=at(path, 3) + r"not JSON"):
        load_outcome_rows(path)
    path.write_text('{"text": "q", "model": "a", "cost": NaN}\n')
    with pytest.raises(DatasetError, match=at(path, 1) + r"cost is not a finite number"):
        load_outcome_rows(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("q,a,1.2,,", "score 1.2 is outside [0, 1]"),
        ("q,a,abc,,", "score is not a number: 'abc'"),
        ("q,a,,-0.5,", "cost -0.5 is negative"),
        ("q,a,,,-1", "tokens -1 is not a whole number >= 0"),
        ("q,a,,,many", "tokens is not a number: 'many'"),
        ("q,a,,,inf", "tokens is not a finite number"),
        (",a,1,,", "text is missing or empty"),
        ("q, ,1,,", "model is missing or empty"),
        ("q,a,1", "3 fields, the header has 5"),
    ],
)
def test_every_bad_csv_row_is_named_by_its_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "evals.csv"
    path.write_text(f"text,model,score,cost,tokens\nq,z,1,0,0\n{line}\n")
    with pytest.raises(DatasetError) as caught:
        load_outcome_rows(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in str(caught.value)


def test_a_csv_line_after_a_multi_line_cell_is_counted_right(tmp_path: Path) -> None:
    path = tmp_path / "evals.csv"
    path.write_text('text,model,score\n"a\nb\nc",m,1\nq,m,2\n')
    with pytest.raises(DatasetError, match=at(path, 5) + r"score 2 is outside"):
        load_outcome_rows(path)


def test_a_csv_header_needs_text_and_model_once(tmp_path: Path) -> None:
    path = tmp_path / "evals.csv"
    path.write_text("prompt,model,score\nq,a,1\n")
    with pytest.raises(DatasetError, match=at(path, 1) + r"the header row lacks column\(s\) text"):
        load_outcome_rows(path)
    path.write_text("text,model,score,score\nq,a,1,0\n")
    with pytest.raises(DatasetError, match=at(path, 1) + r"the header row repeats score"):
        load_outcome_rows(path)


def test_a_prompt_is_one_text_and_a_model_is_scored_once_per_prompt(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "evals.jsonl",
        [GOOD | {"prompt_id": "p"}, GOOD | {"prompt_id": "p", "text": "other", "model": "b"}],
    )
    with pytest.raises(
        DatasetError, match=at(path, 2) + r"prompt_id 'p' has another text on line 1"
    ):
        load_outcome_rows(path)
    path = write_jsonl(tmp_path / "evals.jsonl", [GOOD, GOOD | {"model": "b"}, GOOD])
    with pytest.raises(
        DatasetError, match=at(path, 3) + r"a second row for model 'a' .*first is on line 1"
    ):
        load_outcome_rows(path)


def test_empty_files_and_unknown_file_types_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "evals.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_outcome_rows(empty)
    other = tmp_path / "evals.parquet"
    other.write_text("")
    for read in (load_outcome_rows, detect_format, load_seed_file):
        with pytest.raises(DatasetError, match=r"\.parquet.*JSON lines \(\.jsonl, \.json\) or CSV"):
            read(other)  # type: ignore[operator]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_that_is_not_utf8_text_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"evals{suffix}"
    path.write_bytes(b"text,model\n\xff\xfe,a\n")
    with pytest.raises(DatasetError, match="not a readable text file"):
        load_seed_file(path)


def test_the_format_is_detected_from_the_first_row(tmp_path: Path) -> None:
    assert detect_format(shipped_sample_path()) == "routerbench"
    generic = write_jsonl(tmp_path / "evals.json", [GOOD])
    assert detect_format(generic) == "generic"
    looks_like = write_jsonl(tmp_path / "prompt_only.jsonl", [{"prompt": "q", "model": "a"}])
    assert detect_format(looks_like) == "generic"  # "outcomes" and "prompt" both needed
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n{not json\n")
    assert detect_format(broken) == "generic"  # and the generic loader names line 2
    with pytest.raises(DatasetError, match=at(broken, 2) + r"not JSON"):
        load_seed_file(broken)
    csv_path = tmp_path / "evals.csv"
    csv_path.write_text('text,model\n"{""outcomes"": 1, ""prompt"": 2}",a\n')
    assert detect_format(csv_path) == "generic"


def test_a_routerbench_file_becomes_one_row_per_prompt_and_model() -> None:
    rows = load_seed_file(shipped_sample_path(), "auto")
    assert rows == load_seed_file(shipped_sample_path(), "routerbench")
    first = first_prompts(rows, 2)
    assert len({r.prompt_id for r in first}) == 2
    assert len(first) == 22  # 11 models each
    assert first[0].prompt_id == "winogrande.dev.1181"
    assert all(r.output_tokens is None for r in first)
    assert all(r.score in (0.0, 1.0, None) for r in first)


def test_a_generic_file_cannot_be_read_as_routerbench(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "evals.jsonl", [GOOD])
    with pytest.raises(DatasetError, match=at(path, 1) + r"not a RouterBench row"):
        load_seed_file(path, "routerbench")


def test_limits_count_prompts_and_unknown_models_are_counted() -> None:
    rows = [
        RecordedOutcome("p1", "t1", "a", 1.0, None, None),
        RecordedOutcome("p2", "t2", "a", 1.0, None, None),
        RecordedOutcome("p1", "t1", "x", 0.0, None, None),
        RecordedOutcome("p3", "t3", "y", 0.0, None, None),
    ]
    assert first_prompts(rows, 1) == [rows[0], rows[2]]
    assert first_prompts(rows, 0) == rows
    assert first_prompts(rows, 9) == rows
    kept, unknown = split_known_models(rows, ["a", "b"])
    assert kept == rows[:2]
    assert unknown == {"x": 1, "y": 1}


def test_a_response_column_is_read_and_must_be_text(tmp_path: Path) -> None:
    good = write_jsonl(
        tmp_path / "good.jsonl",
        [
            {"text": "2+2?", "model": "a", "score": 1, "response": "4"},
            {"text": "2+2?", "model": "b", "score": 0},
        ],
    )
    assert [r.response for r in load_outcome_rows(good)] == ["4", None]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "2+2?", "model": "a", "response": 4}])
    with pytest.raises(DatasetError, match=at(bad, 1) + "response is not a string"):
        load_outcome_rows(bad)


def test_field_names_ignore_case(tmp_path: Path) -> None:
    """A "Score" column was an extra column, ignored: the rows were stored unscored."""
    csv_path = tmp_path / "evals.csv"
    csv_path.write_text("Prompt_ID,Text,Model,Score,Cost,Tokens\np1,q,a,0.5,0.01,7\n")
    json_path = write_jsonl(tmp_path / "evals.jsonl", [{"TEXT": "q", "Model": "a", "Score": 0.5}])
    (from_csv,) = load_outcome_rows(csv_path)
    (from_json,) = load_outcome_rows(json_path)
    assert (from_csv.prompt_id, from_csv.score, from_csv.cost, from_csv.output_tokens) == (
        "p1", 0.5, 0.01, 7,
    )  # fmt: skip
    assert (from_json.text, from_json.model, from_json.score) == ("q", "a", 0.5)
    twice = write_jsonl(
        tmp_path / "twice.jsonl", [{"text": "q", "model": "a", "score": 1, "Score": 0}]
    )
    with pytest.raises(DatasetError, match=r"twice.jsonl:1: score is given twice"):
        load_outcome_rows(twice)


def rb_row(prompt: object = "p", a: object = None, **extra: object) -> dict[str, object]:
    """A RouterBench row of models a and b (b's outcome not recorded)."""
    return {"prompt": prompt, "outcomes": {"a": a or {"score": 1, "cost": 0.1}, "b": {}}, **extra}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (rb_row(a={"score": 5}), "a: score 5 is outside"),
        (rb_row(a={"score": 1, "cost": -1}), "a: cost -1 is not a finite number"),
        (rb_row(a={"score": 1, "cost": 1e400}), "a: cost inf is not a finite number"),
        (rb_row(a={"score": 1, "response": 5}), "response is not a string"),
        (rb_row(prompt=None), "prompt is missing"),
        (rb_row(prompt="p\x00"), "NUL"),
        (rb_row(sample_id="x" * 181), "sample_id is longer"),
        ({"prompt": "p", "outcomes": {"a": 1}}, "expected an object"),
        ({"prompt": "p", "outcomes": ["a"]}, "outcomes is not an object"),
    ],
)
def test_a_bad_routerbench_row_is_named_by_its_line(
    tmp_path: Path, row: object, message: str
) -> None:
    """Each was a traceback (or, for a null prompt, the text "None" stored)."""
    path = write_jsonl(tmp_path / "rb.jsonl", [row])
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}:1.*{message}"):
        load_seed_file(path)


def test_a_routerbench_sample_id_given_to_two_prompts_stores_both() -> None:
    """Seeded under one id, the second prompt's outcomes replaced the first's."""
    ids = stored_prompt_ids(["s1", "s2", "s1", "s1"], ["p", "q", "r", "p"])
    assert ids == ["s1", "s2", text_prompt_id("r"), "s1"]


def test_routerbench_rows_without_sample_ids_of_two_files_are_two_prompts(tmp_path: Path) -> None:
    """Their ids were line numbers: the second file's first prompt replaced the first's."""
    one = load_seed_file(write_jsonl(tmp_path / "one.jsonl", [rb_row("p")]))
    two = load_seed_file(write_jsonl(tmp_path / "two.jsonl", [rb_row("q")]))
    assert one[0].prompt_id == text_prompt_id("p") and two[0].prompt_id == text_prompt_id("q")


def test_a_routerbench_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "rb.jsonl"
    path.write_text("\ufeff" + json.dumps(rb_row()) + "\n", encoding="utf-8")
    assert [r.score for r in load_seed_file(path)] == [1.0, None]


def test_a_json_field_named_twice_is_refused(tmp_path: Path) -> None:
    """json.loads kept the last value: a score of 1 then 0 was stored as 0."""
    path = tmp_path / "evals.jsonl"
    path.write_text('{"text": "t", "model": "a", "score": 1, "score": 0}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=at(path, 1) + "score is given twice"):
        load_outcome_rows(path)
