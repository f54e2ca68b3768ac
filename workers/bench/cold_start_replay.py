"""`omnirouter bench cold-start-replay`: the learning loop of `bench cold-start`,
offline, over many orders of the queries.

The live bench streams one order of the file through Kafka in about four
minutes, and its last block moves by several points from run to run with the
stream's timing alone (-6.4 to +0.8 against the warm-started router): a change
to how the router learns cannot be told from noise in a few runs. This replays
the same loop with the same parts, in seconds per order, so a change is
measured paired over many seeds: the router's predictor and its refits, its
one-shot windows (`route_pool_window`: exploration and shadow answers
included), the replay model worker's answers, the judge's sample and the replay
judge's flipped labels.

Left out: Kafka, PostgreSQL and the clock. Windows hold the queries of
WINDOW_SECONDS at the live bench's rate; a window's outcomes reach the store
once the next window is routed (the stream: model latency, the judge, the
store refresh); the predictor refits every ROUTER_REFIT_SECONDS of traffic at
the live bench's rate and as the store grows (ROUTER_REFIT_GROWTH). Nor is
there a realised-spend correction: answers cost what the file records and
windows keep their budget on predicted cost. The warm-started reference is
the live bench's (`cold_start.warm_reference`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from schemas import Assignment
from workers.bench import cold_start
from workers.config import Settings
from workers.routing.dataset import OutcomeTable
from workers.routing.embedder import Embedder
from workers.routing.predictor import HybridPredictor, refit_on
from workers.routing.prices import fitted_prices
from workers.routing.store import OutcomeRecord
from workers.routing.windows import WindowBounds
from workers.stream.judge import select
from workers.stream.judge_replay import ReplayJudge
from workers.stream.model_worker import Answer
from workers.stream.replay import query_events
from workers.stream.replay_worker import ReplayAnswerer
from workers.stream.router_state import predicted_batch, router_predictor
from workers.stream.window_stage import route_pool_window

POOL = "default"
START = datetime(2026, 1, 1, tzinfo=UTC)
# The summary's second figure: the last this many blocks (1,000 queries in blocks of 250).
LATER_BLOCKS = 4


@dataclass(frozen=True)
class ReplayBlock:
    accuracy: float  # of the answers, from the recorded scores
    cost_usd: float  # answers and shadow answers, as recorded
    scored_so_far: int  # answers judged by the end of the block's last window
    warm_accuracy: float
    warm_cost_usd: float


@dataclass(frozen=True)
class ReplayRun:
    seed: int
    budget_per_block_usd: float
    blocks: list[ReplayBlock]

    @property
    def last_block_gap_points(self) -> float:
        """The last block's accuracy against the warm-started router's, in points."""
        last = self.blocks[-1]
        return 100.0 * (last.accuracy - last.warm_accuracy)

    @property
    def later_blocks_gap_points(self) -> float:
        """The same over the last LATER_BLOCKS blocks."""
        later = self.blocks[-LATER_BLOCKS:]
        return 100.0 * float(np.mean([b.accuracy - b.warm_accuracy for b in later]))

    def to_json(self) -> str:
        """The run as one JSON line, as the command writes it and `from_json` reads it."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> ReplayRun:
        """A run as `to_json` wrote it."""
        data = json.loads(line)
        blocks = [ReplayBlock(**block) for block in data["blocks"]]
        return cls(int(data["seed"]), float(data["budget_per_block_usd"]), blocks)


def read_runs(path: Path) -> list[ReplayRun]:
    return [ReplayRun.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def replay(
    table: OutcomeTable,
    embedder: Embedder,
    settings: Settings,
    seed: int,
    queries: int = 2000,
    judge_share: float = 0.2,
    judge_flip: float = 0.1,
    block_size: int = 250,
) -> ReplayRun:
    """One order of the file (`seed`, as the live bench's --seed would give it)
    routed from an empty store, in the live bench's budget mode and pace."""
    shuffled, live, budget = cold_start.traffic(
        table, queries, seed, cold_start.BUDGET_SHARE_OF_DEAREST
    )
    settings = settings.model_copy(
        update={
            "router_models": live.models,
            "router_mode": "budget",
            "router_budget_per_query_usd": budget,
            "router_model_prices": fitted_prices(shuffled),
        }
    )
    loop = ReplayLoop(settings, live, embedder, judge_share, judge_flip)
    window_size = round(cold_start.RATE_PER_SECOND * cold_start.WINDOW_SECONDS)
    refit_every = round(cold_start.RATE_PER_SECOND * settings.router_refit_seconds)
    since_refit = 0
    for start in range(0, len(live), window_size):
        window = list(range(start, min(start + window_size, len(live))))
        loop.route(window)
        since_refit += len(window)
        # The router's two refits: its timer, and the store's growth at a refresh.
        if since_refit >= refit_every or loop.refit_is_due():
            loop.refit()
            since_refit = 0
    warm = cold_start.warm_reference(shuffled, live, embedder, budget, window_size)
    return ReplayRun(seed, budget * block_size, loop.blocks(warm, block_size))


class ReplayLoop:
    """The router, the replay models and the replay judge over one live table."""

    def __init__(
        self,
        settings: Settings,
        live: OutcomeTable,
        embedder: Embedder,
        judge_share: float,
        judge_flip: float,
    ) -> None:
        self.settings = settings
        self.live = live
        self.judge_share = judge_share
        self.predictor: HybridPredictor = router_predictor(settings, embedder)
        self.answerer = ReplayAnswerer(live, latency_ms=0.0, scores=False)
        self.judge = ReplayJudge(live, judge_flip)
        self.events = query_events(live, "replay", POOL)
        self.row_of = {event.query_id: row for row, event in enumerate(self.events)}
        self.answered = np.full(len(live), -1, dtype=np.int64)
        self.spend = np.zeros(len(live))
        self.scored_by = np.zeros(len(live), dtype=np.int64)  # answers judged so far
        self.scored = 0
        self.arriving: list[OutcomeRecord] = []  # the last window's, not yet stored
        self.carried_usd = 0.0
        self.windows = 0

    def route(self, rows: Sequence[int]) -> None:
        """Predict and route one window; store the window before's outcomes."""
        estimates = self.predictor.predict([self.live.prompts[i] for i in rows])
        batch = predicted_batch(
            self.settings.router_models, [self.events[i] for i in rows], estimates
        )
        start = START + timedelta(seconds=cold_start.WINDOW_SECONDS * self.windows)
        bounds = WindowBounds(
            f"w{self.windows}", start, start + timedelta(seconds=cold_start.WINDOW_SECONDS)
        )
        assignments, report = route_pool_window(
            self.settings, POOL, batch.predictions(), bounds, self.carried_usd
        )
        self.carried_usd = report.exploration_carried_usd
        self.windows += 1
        self.predictor.store.add_stored(self.arriving)
        vectors = dict(zip(rows, estimates.vectors, strict=True))
        self.arriving = self.outcomes(assignments, vectors)
        self.scored_by[list(rows)] = self.scored

    def outcomes(
        self, assignments: Sequence[Assignment], vectors: dict[int, np.ndarray]
    ) -> list[OutcomeRecord]:
        """What the replay models answer (`Answer.events`, as the model worker sends
        it) and the judge scores, as the store reads it back."""
        answers = [self.answerer.recorded(a) for a in assignments]
        responses = [answer.events(a, 0)[1] for a, answer in zip(assignments, answers, strict=True)]
        judged = {(r.query_id, r.model) for r in select(responses, self.judge_share)}
        records = []
        for assignment, answer, response in zip(assignments, answers, responses, strict=True):
            row = self.row_of[assignment.query_id]
            if assignment.role != "shadow":
                self.answered[row] = self.live.models.index(assignment.model)
            self.spend[row] += answer.cost_usd or 0.0
            score = None
            if (response.query_id, response.model) in judged:
                score = self.judge.verdict(response).score
                self.scored += score is not None
            records.append(self.record(assignment, score, answer, vectors[row]))
        return records

    def record(
        self, assignment: Assignment, score: float | None, answer: Answer, vector: np.ndarray
    ) -> OutcomeRecord:
        return OutcomeRecord(
            query_id=assignment.query_id,
            model=assignment.model,
            quality_score=score,
            cost_usd=answer.cost_usd,
            output_tokens=answer.output_tokens,
            embedding=vector,
            embedder=self.predictor.embedder.name,
        )

    def refit(self) -> None:
        """The router's refit: heads and blend on a snapshot of the store."""
        predictor = self.predictor
        snapshot = predictor.store.snapshot(self.settings.router_refit_max_outcomes)
        fitted = refit_on(snapshot, predictor.knn)
        if fitted is not None:
            predictor.use(fitted)

    def refit_is_due(self) -> bool:
        """The router's refit on the store's growth (RouterState.refit_if_grown)."""
        settings = self.settings
        return self.predictor.grown_since_fit(
            settings.router_refit_growth, settings.router_refit_max_outcomes
        )

    def blocks(self, warm: np.ndarray, block_size: int) -> list[ReplayBlock]:
        """Per block of queries, in production order (accuracy over recorded scores)."""
        assert (self.answered >= 0).all(), "every query is answered once routed"
        rows = np.arange(len(self.live))
        accuracy = self.live.scores[rows, self.answered]
        warm_accuracy = self.live.scores[rows, warm]
        warm_cost = np.nan_to_num(self.live.costs[rows, warm])
        return [
            ReplayBlock(
                accuracy=float(np.nanmean(accuracy[block])),
                cost_usd=float(self.spend[block].sum()),
                scored_so_far=int(self.scored_by[block][-1]),
                warm_accuracy=float(np.nanmean(warm_accuracy[block])),
                warm_cost_usd=float(warm_cost[block].sum()),
            )
            for block in (slice(b, b + block_size) for b in range(0, len(rows), block_size))
        ]


def _mean_and_error(values: NDArray[np.float64]) -> tuple[float, float]:
    error = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), error


@dataclass(frozen=True)
class ReplaySummary:
    """The last block against the warm-started router, over the seeds."""

    mean_gap_points: float
    standard_error_points: float
    within_two_points: int
    seeds: int
    last_blocks_gap_points: float  # over the last LATER_BLOCKS blocks
    spend_of_warm: float  # the last block's spend over the warm router's

    @classmethod
    def of(cls, runs: Sequence[ReplayRun]) -> ReplaySummary:
        gaps = np.array([run.last_block_gap_points for run in runs])
        later = [run.later_blocks_gap_points for run in runs]
        spend = [run.blocks[-1].cost_usd / run.blocks[-1].warm_cost_usd for run in runs]
        mean, error = _mean_and_error(gaps)
        return cls(
            mean_gap_points=mean,
            standard_error_points=error,
            within_two_points=int((gaps >= -2.0).sum()),
            seeds=len(runs),
            last_blocks_gap_points=float(np.mean(later)),
            spend_of_warm=float(np.mean(spend)),
        )


@dataclass(frozen=True)
class PairedDifference:
    """A version of the code against another, seed by seed (the same orders of the
    queries): the runs differ by the code alone, so the seeds' noise cancels."""

    seeds: int
    last_block_points: float
    last_block_error: float
    later_blocks_points: float  # over the last LATER_BLOCKS blocks
    later_blocks_error: float
    per_block_points: list[float]  # the accuracy's difference, block by block
    spend_ratio: float  # the last block's spend over the other version's

    @classmethod
    def of(cls, runs: Sequence[ReplayRun], against: Sequence[ReplayRun]) -> PairedDifference:
        """`runs` less `against`, over the seeds both hold (ValueError if none)."""
        other = {run.seed: run for run in against}
        pairs = [(run, other[run.seed]) for run in runs if run.seed in other]
        if not pairs:
            raise ValueError("no seed in common: compare runs of the same seeds")
        last = np.array([a.last_block_gap_points - b.last_block_gap_points for a, b in pairs])
        later = np.array([a.later_blocks_gap_points - b.later_blocks_gap_points for a, b in pairs])
        n_blocks = min(min(len(a.blocks), len(b.blocks)) for a, b in pairs)
        per_block = [
            100.0 * float(np.mean([a.blocks[k].accuracy - b.blocks[k].accuracy for a, b in pairs]))
            for k in range(n_blocks)
        ]
        spend = [a.blocks[-1].cost_usd / b.blocks[-1].cost_usd for a, b in pairs]
        last_mean, last_error = _mean_and_error(last)
        later_mean, later_error = _mean_and_error(later)
        return cls(
            len(pairs), last_mean, last_error, later_mean, later_error, per_block,
            float(np.mean(spend)),
        )  # fmt: skip
