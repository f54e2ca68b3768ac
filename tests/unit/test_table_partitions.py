"""The router's tables hold only the changelog partitions it owns: what a rebalance
takes away leaves its memory, whether it was recovered or written by the router
(workers/stream/table_store.py). Real Faust tables of the router's app (tests/tables.py),
told of rebalances as Faust tells them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import SimpleNamespace
from typing import cast

from faust import Event
from faust.assignor.client_assignment import ClientAssignment
from faust.types import TP, EventT, Message, TableT

from schemas import ModelResponse, PredictedQuery, ProbedQuery, QueryEvent
from tests.tables import router_table
from workers.routing.probes import probe_metadata
from workers.stream.cascade_stage import ProbeGatherer, probes_key
from workers.stream.codec import decode
from workers.stream.decision_log import DecisionLog
from workers.stream.table_store import write
from workers.stream.window_stage import WindowStage


async def rebalance(table: TableT, owned: Iterable[int], before: Iterable[int] = ()) -> None:
    """What Faust tells a table of a rebalance that leaves it `owned` (of `before`),
    and of the recovery after it."""
    topic = table.changelog_topic.get_topic_name()
    assigned = {TP(topic, p) for p in owned}
    previous = {TP(topic, p) for p in before}
    await table.on_rebalance(assigned, previous - assigned, assigned - previous, 1)
    await table.on_recovery_completed(assigned, set())


PANEL = ["cheap-a", "cheap-b"]


def probe_answer(
    query_id: str, pool: str = "p", model: str = "cheap-a", text: str = "2+2?", answer: str = "4"
) -> ModelResponse:
    predicted = PredictedQuery(
        query=QueryEvent(query_id=query_id, text=text, pool=pool),
        models=[*PANEL, "dear"],
        quality=[0.6, 0.6, 0.9],
        cost_usd=[0.001, 0.001, 0.01],
    )
    return ModelResponse(
        query_id=query_id, model=model, pool=pool, response=answer,
        metadata=probe_metadata({}, predicted, PANEL), text=text, role="probe", final=False,
    )  # fmt: skip


class ProbedTopic:
    """omnirouter.probed, recording the keys of the probed queries sent."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.values: list[bytes] = []

    async def send(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.keys.append(key)
        self.values.append(value)
        acknowledged = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


def stage_of(probed: ProbedTopic, rebalancing: bool = False) -> WindowStage:
    app = SimpleNamespace(rebalancing=rebalancing)
    return cast(WindowStage, SimpleNamespace(app=app, topics=SimpleNamespace(probed=probed)))


async def test_a_router_forwards_no_probes_of_a_partition_it_lost() -> None:
    """Partition 1 of omnirouter.responses moved to another router, which gathers its
    probes now: this router must not forward them when their deadline passes (a
    ProbedQuery missing answers the owner is still gathering, and a tombstone of the
    owner's entry in its changelog partition)."""
    probes = router_table("probes")
    table, sent = probes.table, probes.sent
    probed = ProbedTopic()
    gatherer = ProbeGatherer(table, stage_of(probed))
    await rebalance(table, owned=[0, 1])
    await gatherer.take(probe_answer("q0"), partition=0)
    await gatherer.take(probe_answer("q1"), partition=1)

    await rebalance(table, owned=[0], before=[0, 1])

    assert await gatherer.forward_overdue(deadline_seconds=0.0) == 1
    assert len(probed.keys) == 1
    assert sent[-1] == (0, probes_key("p", "q0"), None)  # the one tombstone: its own partition
    assert gatherer.pending(probes_key("p", "q1")) is None


async def test_two_pools_queries_of_one_id_are_gathered_apart() -> None:
    """Two pools' queries of id "q" (routed by two routers), their answers
    interleaved: each is forwarded with its own answers. Keyed by the id alone,
    pool p's query took pool o's answers ("Paris" to "2+2?") and o's was never
    forwarded."""
    probed = ProbedTopic()
    gatherer = ProbeGatherer(router_table("probes").table, stage_of(probed))
    await rebalance(gatherer.table, owned=[0])
    france = {"pool": "o", "text": "capital of France?", "answer": "Paris"}
    await gatherer.take(probe_answer("q"), partition=0)
    await gatherer.take(probe_answer("q", model="cheap-a", **france), partition=0)
    await gatherer.take(probe_answer("q", model="cheap-b", **france), partition=0)
    await gatherer.take(probe_answer("q", model="cheap-b"), partition=0)
    forwarded = [decode(value, ProbedQuery) for value in probed.values]
    assert sorted(
        (p.predicted.query.pool, p.predicted.query.text, tuple(a.response for a in p.answers))
        for p in forwarded
    ) == [("o", "capital of France?", ("Paris", "Paris")), ("p", "2+2?", ("4", "4"))]


async def test_a_router_forgets_no_decisions_of_a_partition_it_lost() -> None:
    """Past the de-duplication horizon a router forgets its published decisions, with
    a tombstone in their changelog partition; not those of a partition another
    router owns now (whose entry may be newer than this router's memory of it)."""
    routed = router_table("routed")
    table, sent = routed.table, routed.sent
    log = DecisionLog(table)
    await rebalance(table, owned=[0, 1])
    log.remember(0, log.published_entries(["q0"], 0, at=100.0))
    log.remember(1, log.published_entries(["q1"], 1, at=100.0))

    await rebalance(table, owned=[0], before=[0, 1])

    assert log.forget_before(200.0) == 1
    assert sent == [(0, b"q0", None)]


async def test_no_probes_are_forwarded_while_a_rebalance_runs() -> None:
    """From the revocation to the new assignment the router does not know yet which
    partitions it keeps: their owner afterwards forwards their probes."""
    table = router_table("probes").table
    probed = ProbedTopic()
    await rebalance(table, owned=[0])
    await ProbeGatherer(table, stage_of(probed)).take(probe_answer("q0"), partition=0)
    assert await ProbeGatherer(table, stage_of(probed, rebalancing=True)).forward_overdue(0.0) == 0
    assert await ProbeGatherer(table, stage_of(probed)).forward_overdue(0.0) == 1


def changelog_event(table: TableT, partition: int, key: bytes, value: bytes | None) -> EventT:
    """A changelog record as recovery hands it to the table."""
    topic = table.changelog_topic.get_topic_name()
    message = Message(topic, partition, 0, 0.0, 0, None, key, value, None)
    return Event(table.app, key, value, {}, message)


async def test_a_rebalance_drops_exactly_the_keys_of_partitions_taken_away() -> None:
    table = router_table("routed").table
    await rebalance(table, owned=[0, 1, 2])
    table.apply_changelog_batch(
        [
            changelog_event(table, 0, b"recovered-0", b"v"),
            changelog_event(table, 1, b"recovered-1", b"v"),
            changelog_event(table, 2, b"deleted-2", b"v"),
            changelog_event(table, 2, b"deleted-2", None),  # a tombstone deletes
        ]
    )
    write(table, 0, b"written-0", b"v")
    write(table, 1, b"written-1", b"v")
    write(table, 2, b"written-2", b"v")
    assert set(table.data) == {b"recovered-0", b"recovered-1", b"written-0", b"written-1",
                               b"written-2"}  # fmt: skip

    await rebalance(table, owned=[0, 2], before=[0, 1, 2])  # partition 1 moved away
    assert set(table.data) == {b"recovered-0", b"written-0", b"written-2"}

    # It comes back: recovery brings what its changelog holds now, nothing stale.
    await rebalance(table, owned=[0, 1, 2], before=[0, 2])
    assert b"written-1" not in table.data and b"recovered-1" not in table.data
    table.apply_changelog_batch([changelog_event(table, 1, b"recovered-1", b"new")])
    assert table.data[b"recovered-1"] == b"new"


async def test_nothing_of_a_partition_not_owned_is_kept() -> None:
    """A write that lost the race with a rebalance, and a standby partition's changelog
    events (Faust applies them to the same store), stay out of the table."""
    table = router_table("routed").table
    await rebalance(table, owned=[0])
    write(table, 1, b"late", b"v")
    table.apply_changelog_batch([changelog_event(table, 1, b"standby", b"v")])
    assert set(table.data) == set()


async def test_standby_partitions_are_not_owned() -> None:
    """Should standby replicas be configured, a standby changelog partition is assigned
    to the worker like an active one, but its keys are not the router's to act on."""
    table = router_table("routed").table
    topic = table.changelog_topic.get_topic_name()
    table.app.assignor._assignment = ClientAssignment(actives={topic: [0]}, standbys={topic: [1]})
    await table.on_rebalance({TP(topic, 0), TP(topic, 1)}, set(), {TP(topic, 0), TP(topic, 1)}, 1)
    table.apply_changelog_batch(
        [changelog_event(table, 0, b"active", b"v"), changelog_event(table, 1, b"standby", b"v")]
    )
    assert set(table.data) == {b"active"}
