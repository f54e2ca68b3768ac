"""RouterBench-format files: one JSON object a line with every model's outcome on a prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A RouterBench-format file that cannot be used, with the line at fault."""


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


def load_routerbench(path: str | Path) -> OutcomeTable:
    """Read a RouterBench-format JSONL file; models are those of the first row."""
    sample_ids: list[str] = []
    eval_names: list[str] = []
    prompts: list[str] = []
    score_rows: list[list[float]] = []
    cost_rows: list[list[float]] = []
    responses: list[dict[str, str | None]] = []
    models: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
                outcomes = row["outcomes"]
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"{where}: not a RouterBench row ({exc})") from exc
            if not models:
                models = sorted(outcomes)
            if sorted(outcomes) != models:
                raise DatasetError(f"{where}: models differ from the first row's")
            sample_ids.append(str(row.get("sample_id", line_number)))
            eval_names.append(str(row.get("eval_name", "")))
            prompts.append(str(prompt))
            score_rows.append([_number(outcomes[m].get("score"), f"{where} {m}") for m in models])
            cost_rows.append([_number(outcomes[m].get("cost"), f"{where} {m}") for m in models])
            responses.append({m: outcomes[m].get("response") for m in models})
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
