"""A query whose pool's solve failed is refused once, on a real broker: its dead
letter is one of the decision log's outcomes (workers/stream/decision_log.py),
written before the letter is sent. Before, the letter was sent and nothing was
recorded: a router that crashed before acknowledging the window's records left
them to be read again, and if that solve succeeded (the failure was transient,
or the next owner had other settings) the query was dead-lettered AND routed.

The same held for a query the router could not route at all (predicted for
models it does not route to): its next owner, routing them, routed it.

The window stage is driven in-process (as `solve_windows` would for a batch of
records), its solve made to fail by a cascade hook that raises once; the "crash"
is a new owner whose decision log is recovered from the changelog on the broker.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.types import EventT, TableT
from prometheus_client import REGISTRY
from pydantic import BaseModel

from schemas import Assignment, DeadLetter, PredictedQuery, ProbeAnswer, ProbedQuery, QueryEvent
from tests.integration.test_broker_features import create_topic
from tests.tables import changelog, router_table
from workers.config import Settings
from workers.routing.windows import WindowBounds
from workers.services import LocalBroker
from workers.stream.app import Topics, make_app
from workers.stream.cascade_stage import escalate_batch
from workers.stream.decision_log import DecisionLog
from workers.stream.kafka_io import read_records
from workers.stream.pool_ledger import PoolLedger
from workers.stream.publishers import AcknowledgedPublisher, StartedOnFirstUse, WindowRecords
from workers.stream.router import producer_options
from workers.stream.router_state import RouterState
from workers.stream.table_store import write
from workers.stream.topics import create_topics
from workers.stream.window_stage import CascadeHook, Solved, WindowStage, solve_batch

Outcomes = tuple[list[str], list[tuple[DeadLetter, bytes | None]]]

pytestmark = pytest.mark.integration

MODELS = ["small", "large"]
DECISIONS, LEDGER = changelog("routed"), changelog("pool_ledger")


@dataclass
class FailingOnce:
    """A cascade hook whose first call fails as a solve may (then: route one-shot)."""

    calls: int = 0

    async def __call__(
        self,
        stage: WindowStage,
        pool: str,
        fresh: list[PredictedQuery],
        bounds: WindowBounds,
        carried_usd: float,
    ) -> Solved | None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("solver out of memory")
        return None


async def always_failing(
    stage: WindowStage,
    pool: str,
    fresh: list[PredictedQuery],
    bounds: WindowBounds,
    carried_usd: float,
) -> Solved | None:
    """A cascade hook that fails every solve."""
    raise RuntimeError("solver out of memory")


def prediction(query_id: str) -> PredictedQuery:
    return PredictedQuery(
        query=QueryEvent(query_id=query_id, text=f"question {query_id}"),
        models=MODELS,
        quality=[0.6, 0.9],
        cost_usd=[0.001, 0.01],
        support=[5.0, 5.0],
    )


def records_of(topic: str, values: Sequence[BaseModel]) -> list[EventT]:
    """One record of `topic` per value (offsets 7, 8, ...), as read in generation 1
    of partition 0."""
    events = []
    for offset, value in enumerate(values, start=7):
        message = SimpleNamespace(
            topic=topic, partition=0, offset=offset, key=b"default",
            value=value.model_dump_json().encode(), generation_id=1, acked=False,
        )  # fmt: skip
        events.append(cast(EventT, SimpleNamespace(message=message)))
    return events


def probed(query_id: str) -> ProbedQuery:
    """A cascade pool's probed query, its one probe unanswered (to escalate)."""
    return ProbedQuery(predicted=prediction(query_id), answers=[ProbeAnswer(model="small")])


Stage = Callable[[WindowStage, list[EventT]], Awaitable[None]]


async def escalate(stage: WindowStage, events: list[EventT]) -> None:
    """The escalation stage, for a pool whose cascade is not fitted (on this router)."""
    await escalate_batch(stage, cast(RouterState, SimpleNamespace(cascades={})), events)


async def recovered(bootstrap: str, topic: str) -> dict[bytes, bytes]:
    """A table's entries as its next owner recovers them: the last value of each key."""
    return {
        r.key: r.value
        for r in await read_records(bootstrap, [topic])
        if r.key is not None and r.value is not None
    }


def recovered_table(name: str, entries: dict[bytes, bytes]) -> TableT:
    """The router's table `name`, owning partition 0, holding `entries` as recovered."""
    table = router_table(name, owned=[0]).table
    for key, value in entries.items():
        write(table, 0, key, value)
    return table


async def refuse_crash_and_replay(
    bootstrap: str,
    first: Settings,
    then: Settings,
    hook: CascadeHook | None,
    stage: Stage,
    events: list[EventT],
    handed_over: bool = False,
) -> None:
    """A router with settings `first` reads the records and crashes before it
    acknowledges them (`handed_over`: a rebalance begins before it publishes them);
    the next owner, with settings `then`, recovers the tables from their changelogs
    and reads the records again."""
    app = make_app("test-refused-windows", then, bootstrap)
    topics = Topics.of(app, then)
    # The app's own producer: the window stage sent dead letters with it before.
    faust_producer = await app.maybe_start_producer()
    producer = StartedOnFirstUse(producer_options(then, bootstrap))
    solver = ThreadPoolExecutor(1)

    def owner(
        settings: Settings,
        decisions: dict[bytes, bytes],
        ledger: dict[bytes, bytes],
        rebalancing: bool = False,
    ) -> WindowStage:
        log = DecisionLog(recovered_table("routed", decisions))
        pools = PoolLedger(recovered_table("pool_ledger", ledger))
        publisher = AcknowledgedPublisher(WindowRecords(topics, log, pools), producer)
        generation = SimpleNamespace(consumer_generation_id=1, rebalancing=rebalancing)
        return WindowStage(
            cast(Any, generation), topics, settings, log, pools, solver, publisher, hook
        )

    try:
        await stage(owner(first, {}, {}, handed_over), events)
        decisions = await recovered(bootstrap, DECISIONS)
        ledger = await recovered(bootstrap, LEDGER)
        await stage(owner(then, decisions, ledger), events)
    finally:
        solver.shutdown()
        await producer.stop()
        await faust_producer.stop()


def router_settings(models: list[str]) -> Settings:
    return Settings(
        kafka_partitions=1, router_models=models, router_shadow_share=0.0,
        router_mode="quality", router_quality_target=0.7, metrics_port=0,
    )  # fmt: skip


def outcomes(
    first: Settings,
    then: Settings,
    hook: CascadeHook | None = None,
    stage: Stage = solve_batch,
    values: Sequence[BaseModel] = (prediction("q1"), prediction("q2")),
    handed_over: bool = False,
) -> Outcomes:
    """The queries assigned, and the dead letters with their keys, after the replay."""
    names = then.topic_names()
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(then, bootstrap))
        for changelog in (DECISIONS, LEDGER):
            asyncio.run(create_topic(bootstrap, changelog))
        events = records_of(names["probed" if stage is escalate else "predicted"], values)
        asyncio.run(
            refuse_crash_and_replay(bootstrap, first, then, hook, stage, events, handed_over)
        )
        routed = asyncio.run(read_records(bootstrap, [names[f"route:{m}"] for m in MODELS]))
        letters = asyncio.run(read_records(bootstrap, [names["deadletter"]]))
    assigned = [Assignment.model_validate_json(r.value or b"").query_id for r in routed]
    return assigned, [(DeadLetter.model_validate_json(r.value or b""), r.key) for r in letters]


def assert_refused_once(
    letters: list[tuple[DeadLetter, bytes | None]],
    reason: str,
    topic: str = "omnirouter.predicted",
    body: type[PredictedQuery | ProbedQuery] = PredictedQuery,
) -> None:
    """One letter a query, not a second one from the replay, as letters were before:
    at its record's position, its source key, the query's prediction (the probed
    query's record)."""
    assert len(letters) == 2
    for letter, key in letters:
        assert letter.reason.startswith(reason), letter.reason
        assert (letter.source_topic, letter.source_partition) == (topic, 0)
        assert key == b"default"
        read = body.model_validate_json(base64.b64decode(letter.raw_base64))
        predicted = read if isinstance(read, PredictedQuery) else read.predicted
        assert letter.source_offset == {"q1": 7, "q2": 8}[predicted.query.query_id]
    assert sorted(letter.source_offset for letter, _ in letters) == [7, 8]


def test_a_query_refused_by_a_failed_solve_is_not_routed_when_its_window_is_read_again() -> None:
    """The solve fails once (a transient failure), then succeeds on the replay."""
    settings = router_settings(MODELS)
    assigned, letters = outcomes(settings, settings, FailingOnce())
    assert assigned == []  # before: ["q1", "q2"], each dead-lettered as well
    assert_refused_once(letters, "routing failed in pool 'default': RuntimeError")


def test_a_query_a_router_cannot_route_is_not_routed_by_its_next_owner() -> None:
    """The first router routes none of the prediction's models (it was predicted for
    models added since); the next owner, which routes them, reads it again."""
    assigned, letters = outcomes(router_settings(["other"]), router_settings(MODELS))
    assert assigned == []  # before: ["q1", "q2"], each dead-lettered as well
    assert_refused_once(letters, "predicted for models ['small', 'large'], none of which")


def test_a_probed_query_a_router_cannot_route_is_not_escalated_by_its_next_owner() -> None:
    """The escalation stage alike: refused by a router that routes none of its
    models, the probed query is not escalated by the next owner, which does."""
    assigned, letters = outcomes(
        router_settings(["other"]), router_settings(MODELS), stage=escalate,
        values=[probed("q1"), probed("q2")],
    )  # fmt: skip
    assert assigned == []  # before: ["q1", "q2"], each dead-lettered as well
    reason = "predicted for models ['small', 'large'], none of which"
    assert_refused_once(letters, reason, "omnirouter.probed", ProbedQuery)


def letters_counted(topic: str = "omnirouter.predicted") -> float:
    labels = {"topic": topic, "reason": "other"}  # the kind of both tests' reasons
    return REGISTRY.get_sample_value("omnirouter_dead_letters_total", labels) or 0.0


def test_a_refusal_left_to_the_next_owner_is_counted_once_when_sent() -> None:
    """A rebalance begins before the first router publishes its refusals (every solve
    fails): it sends and records nothing, and the next owner refuses the queries
    and sends their letters. Before, a letter was counted when built: 4 counted for
    2 sent."""
    settings = router_settings(MODELS)
    before = letters_counted()
    assigned, letters = outcomes(settings, settings, always_failing, handed_over=True)
    assert assigned == []
    assert_refused_once(letters, "routing failed in pool 'default': RuntimeError")
    assert letters_counted() == before + 2
