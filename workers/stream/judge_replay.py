"""The replay judge: scores answers with the outcomes recorded in a RouterBench-format
file (REPLAY_DATA_PATH), for the demo and the benchmarks.

A judge is not always right: JUDGE_FLIP_SHARE of its verdicts are flipped
(score -> 1 - score), chosen by a hash of (query_id, model), so a run can be
repeated exactly. Judging costs nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from schemas import ModelResponse
from workers.routing.dataset import OutcomeTable
from workers.stream.judge import Verdict, hashed_share
from workers.stream.replay_worker import NOT_RECORDED, PromptIndex


def is_flipped(response: ModelResponse, share: float) -> bool:
    # Its own salt: which answers are flipped does not depend on which are sampled.
    return hashed_share(response.query_id, response.model, "flip") < share


class ReplayJudge:
    def __init__(self, table: OutcomeTable, flip_share: float = 0.0) -> None:
        self.table = table
        self.flip_share = flip_share
        self.prompts = PromptIndex(table)

    def verdict(self, response: ModelResponse) -> Verdict:
        row = self.prompts.row_of(response.text, response.metadata)
        if row is None or response.model not in self.table.models:
            return Verdict(error=NOT_RECORDED)
        score = float(self.table.scores[row, self.table.models.index(response.model)])
        if math.isnan(score):
            return Verdict(error="no recorded score for this query and model")
        if is_flipped(response, self.flip_share):
            score = 1.0 - score
        return Verdict(score=score, cost_usd=0.0)

    async def score(self, responses: Sequence[ModelResponse]) -> list[Verdict]:
        return [self.verdict(response) for response in responses]

    async def close(self) -> None:
        return None
