"""A query whose pool's solve failed is refused once, on a real broker: its dead
letter is one of the decision log's outcomes (workers/stream/decision_log.py),
written before the letter is sent. Before, the letter was sent and nothing was
recorded: a router that crashed before acknowledging the window's records left
them to be read again, and if that solve succeeded (the failure was transient,
or the next owner had other settings) the query was dead-lettered AND routed.

The window stage is driven in-process (as `solve_windows` would for one record),
its solve made to fail by a cascade hook that raises once; the "crash" is a new
owner whose decision log is recovered from the changelog on the broker.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.types import EventT, TableT

from schemas import Assignment, DeadLetter, PredictedQuery, QueryEvent
from tests.integration.test_broker_features import create_topic
from workers.config import Settings
from workers.routing.windows import WindowBounds
from workers.services import LocalBroker
from workers.stream.app import Topics, make_app
from workers.stream.decision_log import DecisionLog
from workers.stream.kafka_io import read_records
from workers.stream.pool_ledger import PoolLedger
from workers.stream.publishers import AcknowledgedPublisher, StartedOnFirstUse, WindowRecords
from workers.stream.router import producer_options
from workers.stream.topics import create_topics
from workers.stream.window_stage import Solved, WindowStage, publish_pool_window

pytestmark = pytest.mark.integration

MODELS = ["small", "large"]
DECISIONS, LEDGER = "test.routed-changelog", "test.ledger-changelog"


@dataclass
class Table:
    """The part of a Faust table the decision log and the ledger use."""

    changelog: str
    data: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def changelog_topic(self) -> Any:
        return SimpleNamespace(get_topic_name=lambda: self.changelog)


@dataclass
class FailingOnce:
    """A cascade hook whose first call fails as a solve may (then: route one-shot)."""

    calls: int = 0

    async def __call__(
        self, stage: WindowStage, pool: str, fresh: list[PredictedQuery], bounds: WindowBounds
    ) -> Solved | None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("solver out of memory")
        return None


def prediction(query_id: str) -> PredictedQuery:
    return PredictedQuery(
        query=QueryEvent(query_id=query_id, text=f"question {query_id}"),
        models=MODELS,
        quality=[0.6, 0.9],
        cost_usd=[0.001, 0.01],
        support=[5.0, 5.0],
    )


def items_of(predicted: Sequence[PredictedQuery]) -> list[tuple[EventT, PredictedQuery]]:
    """One record (offset 7 of partition 0) holding the predictions, as read in generation 1."""
    message = SimpleNamespace(
        topic="omnirouter.predicted", partition=0, offset=7, key=b"default",
        value=b"(the batch)", generation_id=1, acked=False,
    )  # fmt: skip
    event = cast(EventT, SimpleNamespace(message=message))
    return [(event, p) for p in predicted]


async def recovered(bootstrap: str, topic: str) -> dict[bytes, bytes]:
    """A table's entries as its next owner recovers them: the last value of each key."""
    return {
        r.key: r.value
        for r in await read_records(bootstrap, [topic])
        if r.key is not None and r.value is not None
    }


async def fail_crash_and_replay(settings: Settings, bootstrap: str) -> None:
    app = make_app("test-refused-windows", settings, bootstrap)
    topics = Topics.of(app, settings)
    # The app's own producer: the window stage sent dead letters with it before.
    faust_producer = await app.maybe_start_producer()
    producer = StartedOnFirstUse(producer_options(settings, bootstrap))
    solver = ThreadPoolExecutor(1)
    hook = FailingOnce()
    items = items_of([prediction("q1"), prediction("q2")])

    def owner(decisions: dict[bytes, bytes], ledger: dict[bytes, bytes]) -> WindowStage:
        log = DecisionLog(cast(TableT, Table(DECISIONS, decisions)))
        pools = PoolLedger(cast(TableT, Table(LEDGER, ledger)))
        publisher = AcknowledgedPublisher(WindowRecords(topics, log, pools), producer)
        generation = SimpleNamespace(consumer_generation_id=1, rebalancing=False)
        return WindowStage(
            cast(Any, generation), topics, settings, log, pools, solver, publisher, hook
        )

    try:
        await publish_pool_window(owner({}, {}), "default", 0, items, "default:first")
        # The router crashes before the record is acknowledged; the next owner
        # recovers the tables from their changelogs and reads the record again.
        decisions = await recovered(bootstrap, DECISIONS)
        ledger = await recovered(bootstrap, LEDGER)
        await publish_pool_window(owner(decisions, ledger), "default", 0, items, "default:again")
    finally:
        solver.shutdown()
        await producer.stop()
        await faust_producer.stop()


def test_a_query_refused_by_a_failed_solve_is_not_routed_when_its_window_is_read_again() -> None:
    settings = Settings(
        kafka_partitions=1, router_models=MODELS, router_shadow_share=0.0,
        router_mode="quality", router_quality_target=0.7, metrics_port=0,
    )  # fmt: skip
    names = settings.topic_names()
    routes = [names[f"route:{m}"] for m in MODELS]
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        for changelog in (DECISIONS, LEDGER):
            asyncio.run(create_topic(bootstrap, changelog))
        asyncio.run(fail_crash_and_replay(settings, bootstrap))
        routed = asyncio.run(read_records(bootstrap, routes))
        letters = asyncio.run(read_records(bootstrap, [names["deadletter"]]))

    assigned = [Assignment.model_validate_json(r.value or b"").query_id for r in routed]
    refused = [DeadLetter.model_validate_json(r.value or b"") for r in letters]
    assert assigned == []  # before: ["q1", "q2"], each dead-lettered as well
    assert len(refused) == 2  # one letter each, not a second one from the replay
    for letter, record in zip(refused, letters, strict=True):
        assert letter.reason.startswith("routing failed in pool 'default': RuntimeError")
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
            "omnirouter.predicted", 0, 7,
        )  # fmt: skip
        assert record.key == b"default"  # the source record's key, as before
    bodies = [PredictedQuery.model_validate_json(base64.b64decode(r.raw_base64)) for r in refused]
    assert sorted(b.query.query_id for b in bodies) == ["q1", "q2"]
