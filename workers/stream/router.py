"""The router worker, wired: two stages, two tables, three timers.

- `predict` (workers/stream/predict_stage.py) reads omnirouter.queries (any
  partition, any number of routers), dead-letters what is invalid, predicts in
  micro-batches and forwards to omnirouter.predicted keyed by pool;
- `solve_windows` (workers/stream/window_stage.py) reads omnirouter.predicted,
  where a pool's queries share a partition, gathers a tumbling window
  (ROUTER_WINDOW_SECONDS, closing early at ROUTER_MAX_WINDOW_QUERIES), solves
  each pool's part and publishes assignments and the window report;
- with cascade pools (ROUTER_POOLS[...].cascade), `gather_probes` and
  `escalate` (workers/stream/cascade_stage.py): probe answers gathered from
  omnirouter.responses, then accepted or escalated in windows of
  omnirouter.probed.

Exactly one decision per query, across restarts and rebalances: a batch is
acknowledged only after its body finished (workers/stream/app.py `batches`);
the decision log (workers/stream/decision_log.py) holds every decision,
acknowledged by the broker before its assignment is sent; a replayed window
re-sends recorded decisions unchanged and skips published ones; events read
before a rebalance are left to their partition's owner. Consumers de-duplicate
by query_id. An unexpected error stops the worker (its batch unacknowledged)
instead of skipping what it was doing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import faust
from faust.types import TP, TableT
from mode import CrashingSupervisor
from mode.types.signals import BaseSignalT

from workers.config import ROUTER_APP_ID, Settings
from workers.routing.spend import SpendTracker
from workers.stream.app import (
    PRODUCER_LINGER_MS,
    PRODUCER_MAX_REQUEST_BYTES,
    Topics,
    make_app,
)
from workers.stream.cascade_stage import (
    CascadeRouting,
    ProbeGatherer,
    escalation_stage,
    gather_probes,
)
from workers.stream.decision_log import DecisionLog
from workers.stream.fencing import PartitionProducers
from workers.stream.pool_ledger import PoolLedger
from workers.stream.predict_stage import predict_stage
from workers.stream.publishers import (
    KEY_PARTITIONER,
    AcknowledgedPublisher,
    Publisher,
    StartedOnFirstUse,
    TransactionalPublisher,
    WindowRecords,
)
from workers.stream.router_state import RouterState
from workers.stream.security import aiokafka_options
from workers.stream.transport import BEFORE_ASSIGNMENT_ATTRIBUTE
from workers.stream.window_stage import WindowStage, window_stage

log = logging.getLogger(__name__)


def raw_table(app: faust.App, name: str, settings: Settings, help: str) -> TableT:
    return app.Table(
        name,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.kafka_partitions,
        help=help,
    )


# The router's own producers write a window's records as record batches of up to this
# size (publishers.send): a window's decisions all go to one changelog partition,
# and aiokafka's default 16 KB made that dozens of batches, each one waiting for
# the broker's answer to the request before it (one request in flight per broker).
PUBLISHER_BATCH_BYTES = PRODUCER_MAX_REQUEST_BYTES // 4


def producer_options(settings: Settings, bootstrap_servers: str) -> dict[str, Any]:
    """The router's own producers (publishers.py, fencing.py), as Faust's: every
    replica acknowledges, the same linger and request size; larger batches, and
    the partitioner the publishers place keyed records with."""
    return {
        "bootstrap_servers": bootstrap_servers,
        "acks": "all",
        "linger_ms": PRODUCER_LINGER_MS,
        "max_request_size": PRODUCER_MAX_REQUEST_BYTES,
        "max_batch_size": PUBLISHER_BATCH_BYTES,
        "partitioner": KEY_PARTITIONER,
        **aiokafka_options(settings),
    }


def before_assignment(app: faust.App, hook: Callable[[set[TP]], Awaitable[None]]) -> None:
    """Have `hook` given each new assignment before Faust handles it (transport.py)."""
    hooks = getattr(app, BEFORE_ASSIGNMENT_ATTRIBUTE, None)
    if hooks is None:
        hooks = []
        setattr(app, BEFORE_ASSIGNMENT_ATTRIBUTE, hooks)
    hooks.append(hook)


def keeps_owned_spend(spend: SpendTracker, predicted: str) -> Callable[[set[TP]], Awaitable[None]]:
    """A hook for each assignment: the spend tracker keeps only the pools of the
    partitions of omnirouter.predicted this router still owns (workers/routing/spend.py)."""

    async def keep(assigned: set[TP]) -> None:
        spend.keep_partitions({tp.partition for tp in assigned if tp.topic == predicted})

    return keep


def publisher(
    app: faust.App, records: WindowRecords, options: dict[str, Any], transactions: bool
) -> Publisher:
    """With transactions: one transactional producer per owned partition of
    omnirouter.predicted, started (fencing the previous owner) before the tables
    recover on each assignment. Without: one plain producer. Stopped with the app."""
    producers: PartitionProducers | StartedOnFirstUse
    if transactions:
        producers = PartitionProducers(
            ROUTER_APP_ID, records.topics.predicted.get_topic_name(), options
        )
        before_assignment(app, producers.on_assigned)
        chosen: Publisher = TransactionalPublisher(records, producers)
    else:
        producers = StartedOnFirstUse(options)
        chosen = AcknowledgedPublisher(records, producers)

    @app.on_before_shutdown.connect
    async def stop_producers(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        await producers.stop()

    return chosen


def add_cascade_stages(app: faust.App, stage: WindowStage, state: RouterState) -> None:
    """Cascade pools' probe gatherer, escalation stage and probe deadline
    (workers/stream/cascade_stage.py); a router without cascade pools has none."""
    settings, topics = stage.settings, stage.topics
    table = raw_table(app, "probes", settings, "query_id -> probe answers so far")
    gatherer = ProbeGatherer(table, stage)
    agent = partial(app.agent, supervisor_strategy=CrashingSupervisor)
    agent(topics.responses, name="gather_probes")(partial(gather_probes, gatherer))
    assert topics.probed is not None
    agent(topics.probed, name="escalate")(partial(escalation_stage, stage, state))
    deadline = settings.cascade_probe_deadline_seconds

    @app.timer(settings.cascade_deadline_check_seconds)
    async def probe_deadline() -> None:
        await gatherer.forward_overdue(deadline)

    @app.timer(settings.cascade_refit_seconds)
    async def refit_cascades() -> None:
        await state.refit_cascades()


def build_router_app(
    settings: Settings, bootstrap_servers: str, state: RouterState, transactions: bool
) -> faust.App:
    """The router's Faust app. No I/O here: the caller warms `state` first and says
    whether the broker has transactions (broker_features.use_transactions)."""
    app = make_app(ROUTER_APP_ID, settings, bootstrap_servers)
    topics = Topics.of(app, settings)
    decisions = DecisionLog(raw_table(app, "routed", settings, "query_id -> decision"))
    ledger = PoolLedger(
        raw_table(app, "pool_ledger", settings, "pool -> time billed"),
        settings.cascade_reserve_seconds,
    )
    records = WindowRecords(topics, decisions, ledger, state.spend)
    if state.spend is not None:
        before_assignment(app, keeps_owned_spend(state.spend, topics.predicted.get_topic_name()))
    options = producer_options(settings, bootstrap_servers)
    solver = ThreadPoolExecutor(1, thread_name_prefix="solver")
    cascading = any(policy.cascade for policy in settings.router_pools.values())
    stage = WindowStage(
        app, topics, settings, decisions, ledger, solver,
        publisher(app, records, options, transactions),
        CascadeRouting(state).solve_first_stage if cascading else None,
    )  # fmt: skip
    agent = partial(app.agent, supervisor_strategy=CrashingSupervisor)
    agent(topics.queries, name="predict")(
        partial(predict_stage, state, topics, settings, transactions)
    )
    agent(topics.predicted, name="solve_windows")(partial(window_stage, stage))
    if cascading:
        add_cascade_stages(app, stage, state)

    @app.timer(settings.router_store_refresh_seconds)
    async def refresh() -> None:
        count = await state.refresh_store()
        if count:
            log.info("retrieval store: +%d outcomes, %d queries", count, len(state.predictor.store))
            await state.refit_if_grown()

    @app.timer(settings.router_refit_seconds)
    async def refit() -> None:
        await state.refit()

    @app.timer(min(settings.router_dedup_horizon_seconds / 4, 60.0))
    async def forget() -> None:
        """Published query ids older than ROUTER_DEDUP_HORIZON_SECONDS leave the table
        and its changelog, so its memory stays bounded."""
        forgotten = decisions.forget_before(time.time() - settings.router_dedup_horizon_seconds)
        if forgotten:
            log.info("forgot %d query ids published before the de-duplication horizon", forgotten)

    @app.on_rebalance_complete.connect
    async def track_recovered_decisions(
        sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
    ) -> None:
        decisions.track_recovered()

    return app
