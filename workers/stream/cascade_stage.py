"""Cascade pools on the stream (README "Cascade pools"): the first stage's hook into
the window stage, the probe gatherer and the escalation stage.

- `CascadeRouting.solve_first_stage`: the window stage calls it for a pool's
  fresh queries; for a cascade pool whose policy is fitted it plans direct
  answers, probes and exploration (workers/routing/cascade_window.py), else returns None and
  the pool's window is routed one-shot as any other. Each query's cluster under
  the fitted cascade comes with its prediction (the predict stage computed it
  from the vector it predicted with); only a query without one of the current
  fit (the pool fitted or refitted since it was predicted, an older record) is
  embedded again.
- `gather_probes` (agent on omnirouter.responses, probes only): a table keyed by pool and
  query id holds the answers so far; when every panel model answered (or
  CASCADE_PROBE_DEADLINE_SECONDS passed since the first answer, `forward_overdue`)
  a ProbedQuery goes to omnirouter.probed, keyed by pool: co-partitioned with
  omnirouter.predicted and the decision log. The table holds only the probes of
  the partitions of omnirouter.responses this router owns
  (workers/stream/table_store.py), and none are forwarded while a rebalance runs:
  probes of a partition taken away are gathered and forwarded by its new owner.
- `escalation_stage` (agent on omnirouter.probed): windows per pool as the
  window stage gathers them; accept the best probe answer or escalate, under
  the pool's escalation reserve (budget mode) or at least cost reaching the
  quality its first stages asked of it (quality mode; a query this router cannot route is refused:
  its record is a dead letter); published through the same publisher, keyed
  "escalation:<query_id>" in the decision log, so a query is finalised,
  escalated or refused once across restarts (a forwarded ProbedQuery read twice
  is a duplicate there). It reads each query's cluster off its ProbedQuery, as the
  first stage assigned it; only a query without one of the current fit (an
  older record, or the pool refitted since) is embedded again
  (`cascade_clusters`, for both stages).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from faust.types import EventT, StreamT, TableT
from numpy.typing import NDArray

from schemas import Assignment, ModelResponse, PredictedQuery, ProbedQuery, WindowReport
from workers.routing.cascade_window import (
    CarriesCluster,
    EscalationLimit,
    FittedCascade,
    accept_without_scorer,
    carried_clusters,
    escalation_quality_needed,
    plan_escalation_window,
    route_cascade_window,
)
from workers.routing.probes import (
    PendingProbes,
    add_answer,
    final_response,
    is_complete,
    is_overdue,
    probed_query,
)
from workers.routing.windows import WindowBounds
from workers.stream.app import batches, decode_or_dead_letter, hand_over, value_room_bytes
from workers.stream.codec import BadEvent, decode, encode
from workers.stream.decision_log import Refusal, classify
from workers.stream.publishers import ESCALATION_KEY_PREFIX, PoolWindow
from workers.stream.router_state import RouterState
from workers.stream.table_store import write
from workers.stream.window_stage import WindowStage, aligned, current, log_window, refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CascadeRouting:
    """The first stage's hook: cascade pools' fitted policies live in RouterState."""

    state: RouterState

    async def solve_first_stage(
        self,
        stage: WindowStage,
        pool: str,
        fresh: list[PredictedQuery],
        bounds: WindowBounds,
        exploration_carried_usd: float,
    ) -> tuple[list[Assignment], WindowReport] | None:
        """A cascade pool's window planned with probes (and exploration, with what the
        pool's previous window left of its allowance); None: route it one-shot (not
        a cascade pool, or its cascade is not fitted yet: RouterState logs why)."""
        fitted = self.state.cascades.get(pool)
        if fitted is None:
            if pool in self.state.cascades:
                log.info("window %s: pool %s routed one-shot (cascade not fitted yet)",
                         bounds.window_id, pool)  # fmt: skip
            return None
        settings = stage.settings
        clusters = await cascade_clusters(self.state, fitted, fresh, [p.query.text for p in fresh])
        return await asyncio.get_running_loop().run_in_executor(
            stage.solver,
            lambda: route_cascade_window(
                pool,
                settings.pool_policy(pool),
                fitted,
                fresh,
                settings.router_models,
                clusters,
                bounds,
                solver=settings.router_solver,
                time_limit_seconds=settings.router_solver_time_limit_seconds,
                tie_tolerance=settings.router_tie_tolerance,
                exploration_share=settings.router_exploration_share,
                exploration_carried_usd=exploration_carried_usd,
                capacities=settings.router_model_capacities,
                fallback_model=settings.router_fallback_model,
            ),
        )


# ------------------------------------------------------------------ probe gatherer


def probes_key(pool: str, query_id: str) -> bytes:
    """A probed query's key in the probes table: its pool and id. Keyed by the id
    alone, two pools' queries of one id (routed by two routers, README "Delivery
    guarantees") were gathered as one: one pool's query took the other's answers
    and the other's got no final answer."""
    return f"{pool}\x1f{query_id}".encode()


@dataclass(frozen=True)
class ProbeGatherer:
    """The probes table (`probes_key` -> PendingProbes JSON) and where ready queries go."""

    table: TableT
    stage: WindowStage

    def pending(self, key: bytes) -> PendingProbes | None:
        raw = self.table.data.get(key)
        return None if raw is None else PendingProbes.model_validate_json(raw)

    def _write(self, partition: int, key: bytes, value: bytes | None) -> None:
        write(self.table, partition, key, value)
        self.table.send_changelog(partition, key, value)

    async def forward(self, key: bytes, pending: PendingProbes) -> None:
        """Send the probed query (acknowledged), then drop it from the table; a crash
        between the two forwards it again: a duplicate for the escalation stage."""
        topic = self.stage.topics.probed
        assert topic is not None
        probed = probed_query(pending)
        sent = await topic.send(key=probed.predicted.query.pool.encode(), value=encode(probed))
        await sent
        self._write(pending.partition, key, None)

    async def take(self, response: ModelResponse, partition: int) -> None:
        key = probes_key(response.pool, response.query_id)
        # Written keyed by pool and query id (the table), forwarded keyed by the pool.
        room = min(value_room_bytes(key), value_room_bytes(response.pool.encode()))
        pending = add_answer(self.pending(key), response, time.time(), partition, room)
        if pending is None:
            return
        if is_complete(pending):
            await self.forward(key, pending)
        else:
            self._write(partition, key, pending.model_dump_json().encode())

    async def forward_overdue(self, deadline_seconds: float) -> int:
        """Forward every query whose probes have waited too long, missing answers as
        none. None while a rebalance runs: the partitions held may be on their way to
        another router (the table learns which it keeps once the assignment is in),
        which then gathers and forwards their probes."""
        if self.stage.app.rebalancing:
            return 0
        now, forwarded = time.time(), 0
        for key in list(self.table.data):
            pending = self.pending(key)
            if pending is not None and is_overdue(pending, now, deadline_seconds):
                log.warning(
                    "query %s: probe answers missing after %.0f s (%s); deciding without them",
                    pending.predicted.query.query_id, deadline_seconds,
                    sorted(set(pending.panel) - set(pending.answers)),
                )  # fmt: skip
                await self.forward(key, pending)
                forwarded += 1
        return forwarded


async def gather_probes(gatherer: ProbeGatherer, stream: StreamT[bytes]) -> None:
    """Agent on omnirouter.responses: the probes' answers only (others are not ours)."""
    async for events in batches(stream, 500, 0.05):
        for event in events:
            try:
                response = decode(event.message.value, ModelResponse)
            except BadEvent:
                continue  # the responses' own consumers see it; nothing to gather
            if response.role == "probe" and not response.final:
                await gatherer.take(response, event.message.partition)


# ---------------------------------------------------------------- escalation stage

Item = tuple[EventT, ProbedQuery]


async def escalation_stage(stage: WindowStage, state: RouterState, stream: StreamT[bytes]) -> None:
    settings = stage.settings
    async for events in batches(
        stream, settings.router_max_window_queries, settings.router_window_seconds
    ):
        await escalate_batch(stage, state, events)


def read_probed(raw: bytes | None, models: Sequence[str]) -> ProbedQuery:
    """A probed query with its prediction in this router's model order, as the
    window stage reads predictions (another router may have probed it with the
    models in another order, or fewer); BadEvent when it names none of ours."""
    return aligned_probed(decode(raw, ProbedQuery), models)


def aligned_probed(probed: ProbedQuery, models: Sequence[str]) -> ProbedQuery:
    return probed.model_copy(update={"predicted": aligned(probed.predicted, models)})


async def escalate_batch(stage: WindowStage, state: RouterState, events: Sequence[EventT]) -> None:
    """Each pool's probed queries decided (aligned to this router's models once the
    decision log says they are fresh, `publish_escalations`)."""
    items = await decode_or_dead_letter(
        events, lambda raw: decode(raw, ProbedQuery), stage.topics.deadletter
    )
    groups: dict[tuple[int, str], list[Item]] = defaultdict(list)
    for event, probed in items:
        groups[event.message.partition, probed.predicted.query.pool].append((event, probed))
    closed = datetime.now(UTC)
    for (partition, pool), group in groups.items():
        window_id = f"{pool}:escalation:{closed.isoformat()}:{uuid.uuid4().hex[:8]}"
        await publish_escalations(stage, state, pool, partition, group, window_id)


async def publish_escalations(
    stage: WindowStage,
    state: RouterState,
    pool: str,
    partition: int,
    items: list[Item],
    window_id: str,
) -> None:
    probed = [p for _, p in items]
    ids = [p.predicted.query.query_id for p in probed]
    recorded = stage.decisions.recorded(ESCALATION_KEY_PREFIX + i for i in ids)
    split = classify(
        [p.predicted for p in probed],
        {i: recorded[ESCALATION_KEY_PREFIX + i] for i in ids},
    )
    fresh_ids = {p.query.query_id for p in split.fresh}
    first: dict[str, ProbedQuery] = {}
    refused: dict[str, Refusal] = {}
    for event, item in items:
        query_id = item.predicted.query.query_id
        if query_id not in fresh_ids or query_id in first or query_id in refused:
            continue
        try:
            first[query_id] = aligned_probed(item, stage.settings.router_models)
        except BadEvent as exc:  # this router cannot route it: its record is refused
            refused[query_id] = refusal(stage, event, query_id, str(exc))
    fresh = list(first.values())
    decided, report = await decide(stage, state, pool, fresh, window_id) if fresh else ([], None)
    window = PoolWindow(
        pool=pool,
        partition=partition,
        decided=decided,
        resend=split.resend,
        report=report,
        stage="escalation",
        finals=[final_response(a) for a in [*decided, *split.resend] if a.role == "probe"],
        refused=list(refused.values()),
        resend_refused=split.refused,
    )
    events = [event for event, _ in items]
    published = current(stage, events) and await stage.publisher.publish(
        window, lambda: current(stage, events)
    )
    if not published:
        log.warning("window %s: a rebalance began; its queries are left to the owner", window_id)
        hand_over(events)
    elif report is not None:
        log_window(report, [a for a in decided if a.role == "escalation"])


async def decide(
    stage: WindowStage, state: RouterState, pool: str, fresh: list[ProbedQuery], window_id: str
) -> tuple[list[Assignment], WindowReport]:
    """Accept or escalate each fresh probed query, under the pool's reserve (budget
    mode) or at least cost reaching the quality its first stages asked for."""
    settings = stage.settings
    created = [p.predicted.query.created_at for p in fresh]
    # No overspend in these bounds: an escalation window spends the reserve its first
    # stages kept back of budgets already corrected for it, and has none of its own;
    # its own realised error is booked by the pool's next first-stage window.
    bounds = WindowBounds(window_id, min(created), max(created))
    policy = settings.pool_policy(pool)
    pool_models = list(policy.models or settings.router_models)
    fitted = state.cascades.get(pool)
    if fitted is None:
        return accept_without_scorer(
            pool, fresh, settings.router_models, pool_models, bounds, policy.mode,
            settings.router_model_capacities,
        )  # fmt: skip
    limit = (
        EscalationLimit.needed(escalation_quality_needed(fresh, policy.quality_target or 0.0))
        if policy.mode == "quality"
        else EscalationLimit.reserve(stage.ledger.live_reserve_usd(pool, datetime.now(UTC)))
    )
    try:
        texts = [p.predicted.query.text for p in fresh]
        clusters = await cascade_clusters(state, fitted, fresh, texts)
        return await asyncio.get_running_loop().run_in_executor(
            stage.solver,
            lambda: plan_escalation_window(
                pool,
                fitted,
                fresh,
                settings.router_models,
                clusters,
                limit,
                bounds,
                solver=settings.router_solver,
                tie_tolerance=settings.router_tie_tolerance,
                capacities=settings.router_model_capacities,
            ),
        )
    except Exception:  # the pure core could not plan it: the queries still get an answer
        log.exception("window %s: the escalation plan failed; first answers accepted", window_id)
        return accept_without_scorer(
            pool, fresh, settings.router_models, pool_models, bounds, policy.mode,
            settings.router_model_capacities,
        )  # fmt: skip


async def cascade_clusters(
    state: RouterState,
    fitted: FittedCascade,
    records: Sequence[CarriesCluster],
    texts: Sequence[str],
) -> NDArray[np.int64]:
    """The records' clusters under the pool's cascade (both stages): as an earlier
    stage carried them (the predict stage for the first, the first for the
    escalation stage); the query (`texts`, in the records' order) of an older
    record, or of a fit since replaced, is embedded again (its vector is not on
    the event)."""
    clusters = carried_clusters(fitted, records)
    missing = [row for row, cluster in enumerate(clusters) if cluster is None]
    if missing:
        log.info(
            "cascade fit %s: %d of %d queries embedded again (no cluster of this fit carried)",
            fitted.fit_id, len(missing), len(records),
        )  # fmt: skip
        vectors = await state.embed([texts[row] for row in missing])
        for row, cluster in zip(missing, fitted.policy.clusters(vectors).tolist(), strict=True):
            clusters[row] = int(cluster)
    return np.asarray(clusters, dtype=np.int64)
