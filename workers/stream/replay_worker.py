"""The replay model worker: answers from recorded outcomes in a RouterBench-format
file after a fixed latency. The demo and the benchmarks use it in place of LLMs."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

from schemas import Assignment
from workers.routing.dataset import OutcomeTable
from workers.routing.predictor import CHARS_PER_TOKEN
from workers.stream.model_worker import Answer

NOT_RECORDED = "no recorded outcome for this query and model"


class PromptIndex:
    """A RouterBench table's rows, found by prompt text, else by metadata sample_id."""

    def __init__(self, table: OutcomeTable) -> None:
        self._by_text = {prompt: row for row, prompt in enumerate(table.prompts)}
        self._by_id = {sample_id: row for row, sample_id in enumerate(table.sample_ids)}

    def row_of(self, text: str | None, metadata: Mapping[str, Any]) -> int | None:
        row = self._by_text.get(text) if text is not None else None
        return row if row is not None else self._by_id.get(str(metadata.get("sample_id")))


class ReplayAnswerer:
    """Finds a query by its text (or metadata sample_id) and replays what the model did:
    its answer and cost, and its recorded score unless `scores` is off (then, as a
    real model, it leaves scoring to a judge or the user)."""

    def __init__(self, table: OutcomeTable, latency_ms: float, scores: bool = True) -> None:
        self.table = table
        self.latency_ms = latency_ms
        self.scores = scores
        self.prompts = PromptIndex(table)

    def row_of(self, text: str | None, metadata: Mapping[str, Any]) -> int | None:
        """The recorded prompt: by its text, else by metadata sample_id."""
        return self.prompts.row_of(text, metadata)

    def recorded(self, assignment: Assignment) -> Answer:
        row = self.row_of(assignment.text, assignment.metadata)
        if row is None or assignment.model not in self.table.models:
            return Answer(error=NOT_RECORDED, latency_ms=self.latency_ms)
        column = self.table.models.index(assignment.model)
        score = float(self.table.scores[row, column])
        cost = float(self.table.costs[row, column])
        scored = self.scores and not math.isnan(score)  # NaN: not recorded
        response = self.table.responses[row].get(assignment.model)
        if response is None and math.isnan(score):  # the model's outcome is not recorded
            return Answer(error=NOT_RECORDED, latency_ms=self.latency_ms)
        return Answer(
            response=response,
            quality_score=score if scored else None,
            score_source="replay" if scored else None,
            cost_usd=None if math.isnan(cost) else cost,
            # As a real API reports its usage: tokens by the characters-per-token rule.
            input_tokens=math.ceil(len(assignment.text) / CHARS_PER_TOKEN),
            output_tokens=None if response is None else math.ceil(len(response) / CHARS_PER_TOKEN),
            latency_ms=self.latency_ms,
        )

    async def answer(self, assignments: Sequence[Assignment]) -> list[Answer]:
        await asyncio.sleep(self.latency_ms / 1000)  # the batch is answered concurrently
        return [self.recorded(a) for a in assignments]

    async def close(self) -> None:
        return None
