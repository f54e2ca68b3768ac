"""Outcome files: RouterBench format (one JSON object a line with every model's
outcome on a prompt), and generic warm-start files (one row per prompt and model)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from workers.routing.text_checks import text_refusal


class DatasetError(ValueError):
    """An outcome file that cannot be used, with the line at fault."""


@dataclass(frozen=True)
class OutcomeTable:
    """Prompts x models. NaN marks an outcome that was not recorded (unknown, not 0)."""

    sample_ids: list[str]
    eval_names: list[str]
    prompts: list[str]
    models: list[str]
    scores: np.ndarray  # (n_prompts, n_models), 1.0 / 0.0 / NaN
    costs: np.ndarray  # (n_prompts, n_models), USD / NaN
    responses: list[dict[str, str | None]]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: np.ndarray | list[int]) -> OutcomeTable:
        idx = np.asarray(indices, dtype=int)
        return OutcomeTable(
            sample_ids=[self.sample_ids[i] for i in idx],
            eval_names=[self.eval_names[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            models=self.models,
            scores=self.scores[idx],
            costs=self.costs[idx],
            responses=[self.responses[i] for i in idx],
        )


def _number(value: object, where: str) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DatasetError(f"{where}: expected a number or null, got {value!r}")
    return float(value)


def _recorded(outcome: object, where: str) -> tuple[float, float, str | None]:
    """One model's (score, cost, response) of a RouterBench row, held to what a
    generic row must be (NaN or null: not recorded)."""
    if not isinstance(outcome, dict):
        raise DatasetError(f"{where}: expected an object of score, cost and response")
    score = _number(outcome.get("score"), f"{where} score")
    if not math.isnan(score) and not 0 <= score <= 1:
        raise DatasetError(f"{where}: score {score:g} is outside [0, 1]")
    cost = _number(outcome.get("cost"), f"{where} cost")
    if not math.isnan(cost) and not 0 <= cost < math.inf:
        raise DatasetError(f"{where}: cost {cost:g} is not a finite number >= 0")
    response = outcome.get("response")
    if response is not None:
        response = _text(response, "response", where)
    return score, cost, response


def _routerbench_row(line: str, where: str) -> tuple[dict[str, Any], dict[str, object]]:
    """A RouterBench line's row and its outcomes by model."""
    try:
        row = json.loads(line)
        outcomes = row["outcomes"]
        row["prompt"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{where}: not a RouterBench row ({exc})") from exc
    if not isinstance(outcomes, dict) or not outcomes:
        raise DatasetError(f"{where}: outcomes is not an object of models")
    return row, outcomes


def _sample_id(raw: object, prompt: str, where: str) -> str:
    """A row's sample id; without one, the text's id (as a generic row's): ids
    from line numbers made two files' prompts one query, the second seeded over
    the first."""
    if raw is None:
        return text_prompt_id(prompt)
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    sample_id = _required_text(raw, "sample_id", where).strip()
    if len(sample_id) > MAX_PROMPT_ID_CHARS:
        raise DatasetError(f"{where}: sample_id is longer than {MAX_PROMPT_ID_CHARS} chars")
    return sample_id


def load_routerbench(path: str | Path) -> OutcomeTable:
    """Read a RouterBench-format JSONL file; models are those of the first row. Each
    model's outcome is held to a generic row's rules (`_recorded`); a bad row stops
    the read with its line and the problem."""
    sample_ids: list[str] = []
    eval_names: list[str] = []
    prompts: list[str] = []
    score_rows: list[list[float]] = []
    cost_rows: list[list[float]] = []
    responses: list[dict[str, str | None]] = []
    models: list[str] = []
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            row, outcomes = _routerbench_row(line, where)
            models = models or sorted(outcomes)
            if sorted(outcomes) != models:
                raise DatasetError(f"{where}: models differ from the first row's")
            prompt = _required_text(row["prompt"], "prompt", where)
            recorded = [_recorded(outcomes[m], f"{where} {m}") for m in models]
            sample_ids.append(_sample_id(row.get("sample_id"), prompt, where))
            eval_names.append(str(row.get("eval_name", "")))
            prompts.append(prompt)
            score_rows.append([score for score, _, _ in recorded])
            cost_rows.append([cost for _, cost, _ in recorded])
            responses.append({m: r for m, (_, _, r) in zip(models, recorded, strict=True)})
    if not prompts:
        raise DatasetError(f"{path}: no rows")
    return OutcomeTable(
        sample_ids=sample_ids,
        eval_names=eval_names,
        prompts=prompts,
        models=models,
        scores=np.array(score_rows, dtype=float),
        costs=np.array(cost_rows, dtype=float),
        responses=responses,
    )


def shipped_sample_path() -> Path:
    """The RouterBench sample inside the package (see workers/data/README.md)."""
    return Path(str(resources.files("workers") / "data" / "routerbench_sample.jsonl"))


# ---------------------------------------------------------------------------
# Generic warm-start files: one row per (prompt, model), from a user's own evaluations.

SeedFormat = Literal["auto", "routerbench", "generic"]
GENERIC_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
ACCEPTED_FORMATS = "JSON lines (.jsonl, .json) or CSV with a header row (.csv)"
GENERIC_FIELDS = ("prompt_id", "text", "model", "score", "cost", "tokens", "response")
# Seeded query ids are "<run id>-<prompt_id>" and at most 200 characters.
MAX_PROMPT_ID_CHARS = 180
# Output tokens are stored as a 32-bit count.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class RecordedOutcome:
    """One model's recorded outcome on one prompt; None where it was not recorded."""

    prompt_id: str  # given, or derived from the text (text_prompt_id)
    text: str
    model: str
    score: float | None  # 0..1
    cost: float | None  # USD
    output_tokens: int | None
    response: str | None = None  # what the model answered


def text_prompt_id(text: str) -> str:
    """A stable id for a prompt given without one: rows with the same text share it."""
    return "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _optional_number(value: object, name: str, where: str) -> float | None:
    """JSON null or a CSV empty cell -> None; a number (or a CSV cell holding one) -> float."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "null")):
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise DatasetError(f"{where}: {name} is not a number: {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise DatasetError(f"{where}: {name} is not a number: {value!r}")
    else:
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise DatasetError(f"{where}: {name} is not a finite number") from None
    if not math.isfinite(number):
        raise DatasetError(f"{where}: {name} is not a finite number: {value!r}")
    return number


def _required_text(value: object, name: str, where: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DatasetError(f"{where}: {name} is missing or empty")
    return _text(value, name, where)


def _text(value: object, name: str, where: str) -> str:
    """A string the store and the embedder's tokenizer can take (`text_refusal`)."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {name} is not a string: {value!r}")
    if (reason := text_refusal(value)) is not None:
        raise DatasetError(f"{where}: {name} {reason}")
    return value


class _Pairs(list[tuple[str, object]]):
    """A JSON object's (name, value) pairs in their order, names given twice kept."""


def _fields(row: _Pairs, where: str) -> dict[str, object]:
    """A JSON row's fields by name in lower case, as a CSV header's are ("Score" is
    the score, not an extra column ignored without a word); a name given twice so
    is refused."""
    fields: dict[str, object] = {}
    for name, value in row:
        key = str(name).strip().lower()
        if key in fields:
            raise DatasetError(f"{where}: {key} is given twice (names ignore case)")
        fields[key] = value
    return fields


def _record(row: Mapping[str, object], where: str) -> RecordedOutcome:
    """Validate one row of a generic file (JSON object or CSV row by header), its
    field names in lower case."""
    text = _required_text(row.get("text"), "text", where)
    model = _required_text(row.get("model"), "model", where).strip()
    score = _optional_number(row.get("score"), "score", where)
    if score is not None and not 0 <= score <= 1:
        raise DatasetError(f"{where}: score {score:g} is outside [0, 1]")
    cost = _optional_number(row.get("cost"), "cost", where)
    if cost is not None and cost < 0:
        raise DatasetError(f"{where}: cost {cost:g} is negative")
    tokens = _optional_number(row.get("tokens"), "tokens", where)
    if tokens is not None and (tokens < 0 or not tokens.is_integer()):
        raise DatasetError(f"{where}: tokens {tokens:g} is not a whole number >= 0")
    if tokens is not None and tokens > MAX_TOKENS:
        raise DatasetError(f"{where}: tokens {tokens:g} is more than {MAX_TOKENS}")
    raw_id = row.get("prompt_id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        prompt_id = text_prompt_id(text)
    else:
        prompt_id = _required_text(raw_id, "prompt_id", where).strip()
        if len(prompt_id) > MAX_PROMPT_ID_CHARS:
            raise DatasetError(f"{where}: prompt_id is longer than {MAX_PROMPT_ID_CHARS} chars")
    response = row.get("response")
    if response is not None:
        response = _text(response, "response", where)
    return RecordedOutcome(
        prompt_id=prompt_id,
        text=text,
        model=model,
        score=score,
        cost=cost,
        output_tokens=None if tokens is None else int(tokens),
        response=response or None,
    )


def _json_rows(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                # Pairs, not a dict: json.loads keeps the last of a name given twice.
                row = json.loads(line, object_pairs_hook=_Pairs)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line_number}: not JSON ({exc.msg})") from None
            if not isinstance(row, _Pairs):
                raise DatasetError(f"{path}:{line_number}: not a JSON object")
            yield line_number, _fields(row, f"{path}:{line_number}")


def _csv_rows(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        missing = [name for name in ("text", "model") if name not in header]
        doubled = sorted({name for name in header if header.count(name) > 1})
        if doubled:
            raise DatasetError(f"{path}:1: the header row repeats {', '.join(doubled)}")
        if missing:
            raise DatasetError(
                f"{path}:1: the header row lacks column(s) {', '.join(missing)} "
                f"(columns: {', '.join(GENERIC_FIELDS)})"
            )
        ended = reader.line_num
        for cells in reader:
            line_number, ended = ended + 1, reader.line_num  # a quoted cell may span lines
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise DatasetError(
                    f"{path}:{line_number}: {len(cells)} fields, the header has {len(header)}"
                )
            yield line_number, dict(zip(header, cells, strict=True))


def load_outcome_rows(path: str | Path) -> list[RecordedOutcome]:
    """Read a generic warm-start file: one row per (prompt, model) with text, model,
    score (0..1), cost (USD), tokens (output) and optionally prompt_id (without it,
    rows with the same text are one prompt) and response (the model's answer).
    JSON lines (.jsonl, .json) or CSV with a header row (.csv); null or an empty
    cell: not recorded."""
    path = Path(path)
    kind = GENERIC_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{path}: unknown file type {path.suffix!r}; use {ACCEPTED_FORMATS}")
    try:
        rows = list(_csv_rows(path) if kind == "csv" else _json_rows(path))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable text file ({exc})") from None
    records: list[RecordedOutcome] = []
    first_line: dict[tuple[str, str], int] = {}
    text_of: dict[str, tuple[str, int]] = {}
    for line_number, row in rows:
        where = f"{path}:{line_number}"
        record = _record(row, where)
        text, line = text_of.setdefault(record.prompt_id, (record.text, line_number))
        if text != record.text:
            raise DatasetError(
                f"{where}: prompt_id {record.prompt_id!r} has another text on line {line}"
            )
        seen = first_line.setdefault((record.prompt_id, record.model), line_number)
        if seen != line_number:
            raise DatasetError(
                f"{where}: a second row for model {record.model!r} on this prompt "
                f"(the first is on line {seen})"
            )
        records.append(record)
    if not records:
        raise DatasetError(f"{path}: no rows")
    return records


def detect_format(path: str | Path) -> Literal["routerbench", "generic"]:
    """RouterBench if the first JSON row has "outcomes" and "prompt"; generic otherwise
    (CSV always)."""
    path = Path(path)
    kind = GENERIC_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{path}: unknown file type {path.suffix!r}; use {ACCEPTED_FORMATS}")
    if kind == "csv":
        return "generic"
    try:
        with open(path, encoding="utf-8-sig") as handle:
            row = json.loads(next((line for line in handle if line.strip()), ""))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "generic"  # load_outcome_rows names the line at fault
    is_routerbench = isinstance(row, dict) and "outcomes" in row and "prompt" in row
    return "routerbench" if is_routerbench else "generic"


def stored_prompt_ids(sample_ids: Sequence[str], prompts: Sequence[str]) -> list[str]:
    """Each prompt's id in the store: its sample id, or its text's id where an
    earlier row gave that sample id to another prompt (RouterBench has a few such
    ARC ids: seeded under one id, the second prompt's outcomes replaced the first's)."""
    first_text: dict[str, str] = {}
    return [
        sample_id if first_text.setdefault(sample_id, prompt) == prompt else text_prompt_id(prompt)
        for sample_id, prompt in zip(sample_ids, prompts, strict=True)
    ]


def table_records(table: OutcomeTable) -> list[RecordedOutcome]:
    """A RouterBench table as rows, one per (prompt, model); NaN -> None."""
    prompt_ids = stored_prompt_ids(table.sample_ids, table.prompts)
    return [
        RecordedOutcome(
            prompt_id=prompt_ids[row],
            text=prompt,
            model=model,
            score=None if math.isnan(score := table.scores[row, column]) else float(score),
            cost=None if math.isnan(cost := table.costs[row, column]) else float(cost),
            output_tokens=None,
            response=table.responses[row].get(model),
        )
        for row, prompt in enumerate(table.prompts)
        for column, model in enumerate(table.models)
    ]


def load_seed_file(path: str | Path, file_format: SeedFormat = "auto") -> list[RecordedOutcome]:
    """Rows of a warm-start file in either format (auto: see detect_format)."""
    chosen = detect_format(path) if file_format == "auto" else file_format
    if chosen == "routerbench":
        return table_records(load_routerbench(path))
    return load_outcome_rows(path)


def first_prompts(records: Sequence[RecordedOutcome], limit: int) -> list[RecordedOutcome]:
    """The rows of the first `limit` prompts, in file order (limit <= 0: all)."""
    if limit <= 0:
        return list(records)
    kept: set[str] = set()
    for record in records:
        if len(kept) == limit:
            break
        kept.add(record.prompt_id)
    return [r for r in records if r.prompt_id in kept]


def split_known_models(
    records: Sequence[RecordedOutcome], models: Sequence[str]
) -> tuple[list[RecordedOutcome], dict[str, int]]:
    """The rows of known models, and how many rows each unknown model has."""
    known = set(models)
    unknown: dict[str, int] = {}
    for record in records:
        if record.model not in known:
            unknown[record.model] = unknown.get(record.model, 0) + 1
    return [r for r in records if r.model in known], dict(sorted(unknown.items()))
