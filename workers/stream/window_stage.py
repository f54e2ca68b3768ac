"""The router's second stage: omnirouter.predicted -> one window per pool -> solve -> publish.

A pool's queries share a partition of omnirouter.predicted, so one router holds
a pool's whole window. A record holds one micro-batch's predictions of a pool
(PredictedBatch), read at once; the queries of the records gathered within
ROUTER_WINDOW_SECONDS (at most `records_per_take` records) form windows
of at most ROUTER_MAX_WINDOW_QUERIES queries, so one record's queries may fall
into two windows; a record is acknowledged once every window of the batch is
published (`batches`). For each pool of a window:
1. split the queries by the decision log: fresh, decided (or refused) but maybe
   unsent, published;
2. solve the fresh ones (off the event loop) under what the pool's ledger says
   is left of its time and exploration allowance;
3. publish decisions, assignments, the window report and the ledger entry
   (publishers.py: each decision acknowledged before its assignment is sent, or
   all in one Kafka transaction), unless a rebalance began meanwhile.
A fresh query this router cannot route (predicted for models it does not route
to) is refused, and so are a pool's fresh queries when its solve fails: each
one's outcome is a dead letter with the reason, recorded in the decision log and
published as a decision is (`refusals`), so a window read again (by this router
or one with other settings) never routes a query it refused, nor dead-letters it
twice; other pools go on. Anything else
that fails stops the worker with the batch unacknowledged (`batches`), so its
successor routes it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import faust
from faust.types import EventT, StreamT

from schemas import Assignment, PredictedBatch, PredictedQuery, QueryHints, WindowReport
from workers.config import Settings
from workers.routing.windows import WindowBounds, route_window, traffic_span
from workers.stream.app import (
    Topics,
    batches,
    decode_or_dead_letter,
    hand_over,
    letter_for,
)
from workers.stream.codec import BadEvent, decode, encode
from workers.stream.decision_log import DecisionLog, Refusal, classify
from workers.stream.pool_ledger import PoolLedger
from workers.stream.predict_stage import PREDICT_BATCH_SECONDS
from workers.stream.publishers import PoolWindow, Publisher

log = logging.getLogger(__name__)

Item = tuple[EventT, PredictedQuery]
Solved = tuple[list[Assignment], WindowReport]
# A cascade pool's first stage (cascade_stage.py), given the pool's carried exploration
# allowance: None routes the window one-shot.
CascadeHook = Callable[
    ["WindowStage", str, list[PredictedQuery], WindowBounds, float], Awaitable[Solved | None]
]


@dataclass(frozen=True)
class WindowStage:
    """What the stage needs: the app (for its consumer generation), topics,
    settings, the decision log, the pools' ledger, the solver's thread, how a
    window is published (publishers.py) and cascade pools' first stage."""

    app: faust.App
    topics: Topics
    settings: Settings
    decisions: DecisionLog
    ledger: PoolLedger
    solver: ThreadPoolExecutor
    publisher: Publisher
    cascade: CascadeHook | None = None


def aligned(predicted: PredictedQuery, models: Sequence[str]) -> PredictedQuery:
    """The prediction in the order of this router's models. A model it does not
    cover (one added since it was predicted) is not allowed for the query;
    BadEvent when it covers none of its pool's models."""
    if list(predicted.models) == list(models):
        return predicted
    index = {m: i for i, m in enumerate(predicted.models)}
    covered = [m for m in models if m in index]
    hints = predicted.query.hints or QueryHints()
    allowed = [m for m in covered if hints.allowed_models is None or m in hints.allowed_models]
    if not allowed:
        raise BadEvent(
            f"predicted for models {list(predicted.models)}, none of which this router "
            "routes to (or the query allows): predict it again by producing it anew"
        )

    def column(values: Sequence[float], missing: float) -> list[float]:
        return [values[index[m]] if m in index and values else missing for m in models]

    query = predicted.query.model_copy(
        update={"hints": hints.model_copy(update={"allowed_models": allowed})}
    )
    return predicted.model_copy(
        update={
            "query": query,
            "models": list(models),
            "quality": column(predicted.quality, 0.0),
            "cost_usd": column(predicted.cost_usd, 0.0),
            "support": column(predicted.support, 0.0),
            "mean_variance": column(predicted.mean_variance, 0.0)
            if predicted.mean_variance
            else [],
        }
    )


def read_predictions(raw: bytes | None) -> list[PredictedQuery]:
    """A record's predictions: a batch's rows, or the one prediction of a record of
    a router before batches. BadEvent (the batch's reason) when it is neither."""
    try:
        return decode(raw, PredictedBatch).predictions()
    except BadEvent as not_a_batch:
        try:
            return [decode(raw, PredictedQuery)]
        except BadEvent:
            raise not_a_batch from None


async def read_items(stage: WindowStage, events: Sequence[EventT]) -> list[Item]:
    """Each query of the events' records, as predicted (aligned to this router's
    models once the decision log says it is fresh: `routable`). A record that is
    no prediction is a dead letter."""
    records = await decode_or_dead_letter(events, read_predictions, stage.topics.deadletter)
    return [(event, predicted) for event, predictions in records for predicted in predictions]


def routable(
    stage: WindowStage, fresh: list[PredictedQuery]
) -> tuple[list[PredictedQuery], dict[str, str]]:
    """The fresh queries aligned to this router's models, and the reason (query id ->
    reason) of each one it cannot route, to be refused."""
    aligned_queries: list[PredictedQuery] = []
    unroutable: dict[str, str] = {}
    for predicted in fresh:
        try:
            aligned_queries.append(aligned(predicted, stage.settings.router_models))
        except BadEvent as exc:
            unroutable[predicted.query.query_id] = str(exc)
    return aligned_queries, unroutable


def windows_of(items: list[Item], max_queries: int) -> list[list[Item]]:
    """The items, in order, in as few windows of at most `max_queries` as hold them,
    of even sizes (one record's queries may fall into two windows)."""
    count = -(-len(items) // max_queries)
    size = -(-len(items) // count) if items else 0
    return [items[start : start + size] for start in range(0, len(items), size or 1)]


def current(stage: WindowStage, events: Sequence[EventT]) -> bool:
    """Whether the events were read in the consumer's current generation and no
    rebalance has begun since. Otherwise this router may no longer own their
    partition: it must not decide or publish them (the owner re-reads them from
    the committed offset, and finds every decision stored before)."""
    generation = stage.app.consumer_generation_id
    return not stage.app.rebalancing and all(
        event.message.generation_id == generation for event in events
    )


def records_per_take(settings: Settings) -> int:
    """The most records of omnirouter.predicted gathered at once: what a window's time
    brings at one record per pool and predict batch (twice over: a second router's
    batches, jitter), and at least ROUTER_MAX_WINDOW_QUERIES in full batches. No
    more, so a backlog is read a bounded number of queries at a time (2,000 records
    of 256 queries each had held a 20,000-query burst in memory at once)."""
    in_time = math.ceil(2 * settings.router_window_seconds / PREDICT_BATCH_SECONDS)
    full = math.ceil(settings.router_max_window_queries / settings.router_predict_batch)
    return max(in_time, full)


async def window_stage(stage: WindowStage, stream: StreamT[bytes]) -> None:
    settings = stage.settings
    async for events in batches(stream, records_per_take(settings), settings.router_window_seconds):
        await solve_batch(stage, events)


async def solve_batch(stage: WindowStage, events: Sequence[EventT]) -> None:
    closed = datetime.now(UTC)
    # A pool's queries share a partition; grouping by both keeps each published
    # window within one partition (and one transaction) whatever a producer did.
    groups: dict[tuple[int, str], list[Item]] = defaultdict(list)
    for event, predicted in await read_items(stage, events):
        groups[event.message.partition, predicted.query.pool].append((event, predicted))
    for (partition, pool), group in groups.items():
        for window in windows_of(group, stage.settings.router_max_window_queries):
            window_id = f"{pool}:{closed.isoformat()}:{uuid.uuid4().hex[:8]}"
            await publish_pool_window(stage, pool, partition, window, window_id)


async def publish_pool_window(
    stage: WindowStage, pool: str, partition: int, items: list[Item], window_id: str
) -> None:
    query_ids = [p.query.query_id for _, p in items]
    split = classify([p for _, p in items], stage.decisions.recorded(query_ids))
    for query_id in split.duplicates:
        log.info("duplicate query_id %s skipped", query_id)
    fresh, reasons = routable(stage, split.fresh)
    solved: Solved | None = None
    if fresh:
        try:
            solved = await solve_fresh(stage, pool, fresh, window_id)
        except Exception as exc:  # the pure core could not plan this pool's window
            log.exception("window %s: the solve failed; its queries are refused", window_id)
            reason = f"routing failed in pool {pool!r}: {type(exc).__name__}: {exc}"
            reasons.update(dict.fromkeys((p.query.query_id for p in fresh), reason))
    # The window's records, once each (a record holds several queries).
    events = list({id(event): event for event, _ in items}.values())
    window = PoolWindow(
        pool=pool,
        partition=partition,
        decided=solved[0] if solved else [],
        resend=split.resend,
        report=solved[1] if solved else None,
        refused=refusals(stage, items, reasons),
        resend_refused=split.refused,
    )
    published = current(stage, events) and await stage.publisher.publish(
        window, lambda: current(stage, events)
    )
    if not published:
        log.warning("window %s: a rebalance began; its queries are left to the owner", window_id)
        hand_over(events)
    elif window.report is not None:
        log_window(window.report, window.decided)


async def solve_fresh(
    stage: WindowStage, pool: str, fresh: list[PredictedQuery], window_id: str
) -> Solved:
    """The pool's fresh queries solved on the solver thread (a cascade pool's by
    its first stage); raises what made the solve fail."""
    settings = stage.settings
    account = stage.ledger.account(pool)
    start, end = traffic_span(
        [p.query.created_at for p in fresh],
        account.billed_until,
        timedelta(seconds=settings.router_window_seconds),
    )
    # The pool's realised overspend its budget repays (workers/routing/windows.py).
    overspend = account.overspend_usd if settings.router_spend_correction else 0.0
    bounds = WindowBounds(window_id, start, end, overspend)
    if stage.cascade is not None:
        cascaded = await stage.cascade(stage, pool, fresh, bounds, account.exploration_carried_usd)
        if cascaded is not None:
            return cascaded
    return await asyncio.get_running_loop().run_in_executor(
        stage.solver,
        lambda: route_pool_window(settings, pool, fresh, bounds, account.exploration_carried_usd),
    )


def route_pool_window(
    settings: Settings,
    pool: str,
    queries: Sequence[PredictedQuery],
    bounds: WindowBounds,
    exploration_carried_usd: float,
) -> Solved:
    """A one-shot window of `pool` routed as the settings say (`route_window`)."""
    return route_window(
        pool,
        settings.pool_policy(pool),
        queries,
        settings.router_models,
        bounds,
        capacities=settings.router_model_capacities,
        fallback_model=settings.router_fallback_model,
        solver=settings.router_solver,
        time_limit_seconds=settings.router_solver_time_limit_seconds,
        tie_tolerance=settings.router_tie_tolerance,
        exploration_share=settings.router_exploration_share,
        exploration_carried_usd=exploration_carried_usd,
        shadow_share=settings.router_shadow_share,
    )


def refusals(stage: WindowStage, items: list[Item], reasons: dict[str, str]) -> list[Refusal]:
    """Each query of `reasons` (query id -> reason) refused: its dead letter holds its
    prediction as read, at its record's position (once, though read twice)."""
    refused: dict[str, Refusal] = {}
    for event, predicted in items:
        query_id = predicted.query.query_id
        if query_id in reasons and query_id not in refused:
            reason, value = reasons[query_id], encode(predicted)
            refused[query_id] = refusal(stage, event, query_id, reason, value)
    return list(refused.values())


def refusal(
    stage: WindowStage, event: EventT, query_id: str, reason: str, value: bytes | None = None
) -> Refusal:
    """The query's refusal: the dead letter of its record (`value`: of the part of it
    that is the query), to be recorded in the decision log and then sent."""
    key, letter = letter_for(event, reason, stage.topics.deadletter, value)
    return Refusal(query_id=query_id, key=key, letter=letter)


def log_window(report: WindowReport, assignments: list[Assignment]) -> None:
    """The window's line (its metrics are counted by the publisher)."""
    log.info(
        "window %s: %d queries, status %s, predicted spend $%.6f of %s, solved in %.1f ms",
        report.window_id, report.query_count, report.solver_status,
        report.predicted_spend_usd, report.window_budget_usd, report.solve_seconds * 1000,
        extra={
            "window_id": report.window_id,
            "pool": report.pool,
            "query_ids": [a.query_id for a in assignments],
            "models": [a.model for a in assignments],
        },
    )  # fmt: skip
