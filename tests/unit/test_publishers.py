"""The publishers (workers/stream/publishers.py) with the broker replaced by a
recording producer: what a committed window leaves in the router's memory, what
a fenced one does not, when being fenced stops the router, and that without
transactions no assignment leaves before its decision is acknowledged."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from schemas import Assignment, DeadLetter, WindowReport
from tests.tables import RouterTable, changelog, router_table
from workers.config import model_topic
from workers.routing.spend import SpendTracker
from workers.stream.app import Topics
from workers.stream.codec import dead_letter
from workers.stream.decision_log import DECIDED, PUBLISHED, REFUSED, DecisionLog, Refusal
from workers.stream.fencing import Fenced, PartitionProducers
from workers.stream.pool_ledger import PoolLedger
from workers.stream.publishers import (
    AcknowledgedPublisher,
    PoolWindow,
    Publisher,
    Record,
    StartedOnFirstUse,
    TransactionalPublisher,
    WindowRecords,
    send,
)


@dataclass
class RecordedBatch:
    """aiokafka's BatchBuilder as far as the publishers use it: `capacity` records."""

    capacity: int
    keys: list[bytes] = field(default_factory=list)
    closed: bool = False

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        if self.closed or len(self.keys) == self.capacity:
            self.closed = True
            return None
        self.keys.append(key)
        return object()

    def close(self) -> None:
        self.closed = True


@dataclass
class RecordingProducer:
    """Records sent (topic, key, partition), in record batches of up to
    `batch_capacity` records, over topics of one partition; each batch's
    acknowledgement a future the test may hold back."""

    sent: list[tuple[str, bytes | None, int | None]] = field(default_factory=list)
    acks: list[asyncio.Future[None]] = field(default_factory=list)
    hold_acks: bool = False
    batch_capacity: int = 1000

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> RecordedBatch:
        return RecordedBatch(self.batch_capacity)

    async def send_batch(
        self, batch: RecordedBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        assert batch.closed  # nothing is added to a batch once it is submitted
        self.sent += [(topic, key, partition) for key in batch.keys]
        ack = asyncio.get_running_loop().create_future()
        if not self.hold_acks:
            ack.set_result(None)
        self.acks.append(ack)
        return ack


@dataclass
class Producers:
    """PartitionProducers whose transactions record, or end fenced."""

    fenced: bool
    producer: RecordingProducer = field(default_factory=RecordingProducer)

    @asynccontextmanager
    async def transaction(self, partition: int) -> AsyncIterator[RecordingProducer]:
        yield self.producer
        if self.fenced:
            raise Fenced(f"predicted[{partition}]: ProducerFenced")


@dataclass
class Plain:
    """StartedOnFirstUse, already started."""

    producer: RecordingProducer

    async def get(self) -> RecordingProducer:
        return self.producer


def topic(name: str) -> Any:
    return SimpleNamespace(get_topic_name=lambda: name)


def assignment(query_id: str) -> Assignment:
    return Assignment(
        query_id=query_id, text="t", model="m", pool="default", window_id="w",
        window_start="2026-01-01T00:00:00Z", window_end="2026-01-01T00:00:01Z",
        predicted_quality=0.5, predicted_cost_usd=0.1,
    )  # fmt: skip


ROUTED, LEDGER = changelog("routed"), changelog("pool_ledger")


def window_records() -> tuple[WindowRecords, RouterTable]:
    routed = router_table("routed")
    topics = cast(
        Topics,
        SimpleNamespace(windows=topic("w"), deadletter=topic("letters")),
    )
    ledger = PoolLedger(router_table("pool_ledger").table)
    return WindowRecords(topics, DecisionLog(routed.table), ledger), routed


def publisher(fenced: bool) -> tuple[TransactionalPublisher, Producers, RouterTable]:
    records, routed = window_records()
    producers = Producers(fenced)
    return TransactionalPublisher(records, cast(PartitionProducers, producers)), producers, routed


WINDOW = PoolWindow("default", 2, [assignment("new")], [assignment("old")], report=None)


async def test_a_committed_window_is_remembered_and_marked_published() -> None:
    published, producers, routed = publisher(fenced=False)
    assert await published.publish(WINDOW, lambda: True)
    assert producers.producer.sent == [
        (ROUTED, b"new", 2),  # published markers, in the pool's partition,
        (ROUTED, b"old", 2),  # committed with the assignments
        (model_topic("m"), b"new", 0),  # by the key: the topic's one partition
        (model_topic("m"), b"old", 0),  # a recorded decision re-sent unchanged
    ]
    assert set(routed.data) == {b"new", b"old"}
    assert all(value.startswith(PUBLISHED) for value in routed.data.values())
    assert routed.sent == []  # nothing written outside the transaction


async def test_a_window_fenced_in_a_rebalance_leaves_nothing_behind() -> None:
    published, _, routed = publisher(fenced=True)
    assert not await published.publish(WINDOW, lambda: False)
    assert dict(routed.data) == {} and routed.sent == []  # the new owner decides it


async def test_fenced_outside_a_rebalance_stops_the_router() -> None:
    published, _, routed = publisher(fenced=True)
    with pytest.raises(RuntimeError, match="outside a rebalance"):
        await published.publish(WINDOW, lambda: True)
    assert dict(routed.data) == {}


async def test_without_transactions_no_assignment_leaves_before_its_decision_is_acked() -> None:
    records, routed = window_records()
    producer = RecordingProducer(hold_acks=True)
    acknowledged = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    publishing = asyncio.ensure_future(acknowledged.publish(WINDOW, lambda: True))
    for _ in range(5):
        await asyncio.sleep(0)
    assert producer.sent == [(ROUTED, b"new", 2)]  # the decision, nothing else yet
    producer.acks[0].set_result(None)  # the broker has it
    for _ in range(5):
        await asyncio.sleep(0)
        for ack in producer.acks:
            if not ack.done():
                ack.set_result(None)
    assert await asyncio.wait_for(publishing, timeout=1)
    assert [t for t, _, _ in producer.sent[1:3]] == [model_topic("m"), model_topic("m")]
    assert routed.data[b"new"].startswith(PUBLISHED) and routed.data[b"old"].startswith(PUBLISHED)


async def test_without_transactions_a_rebalance_after_the_decision_stops_the_sends() -> None:
    records, routed = window_records()
    producer = RecordingProducer()
    acknowledged = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    assert not await acknowledged.publish(WINDOW, lambda: False)
    assert [t for t, _, _ in producer.sent] == [ROUTED]  # decided, never sent
    assert routed.data[b"new"].startswith(DECIDED)  # the new owner re-sends it unchanged


async def test_records_go_in_batches_per_partition_in_their_order() -> None:
    producer = RecordingProducer(batch_capacity=2)
    given = [Record("a", b"v", f"a{i}".encode(), None if i % 2 else 3) for i in range(5)]
    keyed = [Record("b", b"v", f"b{i}".encode(), None) for i in range(3)]
    acks = await send(cast(AIOKafkaProducer, producer), given + keyed)
    assert producer.sent == [
        ("a", b"a0", 3), ("a", b"a2", 3),  # given partitions
        ("a", b"a4", 3),  # the batch before it was full
        ("a", b"a1", 0), ("a", b"a3", 0),  # by the key (topics of one partition here)
        ("b", b"b0", 0), ("b", b"b1", 0),
        ("b", b"b2", 0),
    ]  # fmt: skip
    assert len(acks) == 5  # one acknowledgement per batch


async def test_without_transactions_a_window_handed_over_after_its_decisions_is_billed_once() -> (
    None
):
    """A rebalance right after the decisions: the window's report and ledger entry
    are written with them. The owner that re-reads the window finds every decision
    made and nothing new to report; before, no one ever billed the window's time,
    and the pool's next window billed it again."""
    records, _ = window_records()
    producer = RecordingProducer()
    acknowledged = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    report = WindowReport(
        window_id="w", pool="default", window_start=start,
        window_end=start + timedelta(seconds=5), query_count=1, mode="budget",
        window_budget_usd=1.0, predicted_spend_usd=0.1, predicted_mean_quality=0.5,
        solver="fast", solver_status="near_optimal", solve_seconds=0.0,
        assignments_per_model={"m": 1},
    )  # fmt: skip
    window = PoolWindow("default", 2, [assignment("new")], [], report=report)
    assert not await acknowledged.publish(window, lambda: False)
    assert [t for t, _, _ in producer.sent] == [ROUTED, "w", LEDGER]
    assert records.ledger.account("default").billed_until == start + timedelta(seconds=5)


def refusal(query_id: str) -> Refusal:
    letter = dead_letter(b"the prediction", "omnirouter.predicted", 2, 9, "routing failed")
    return Refusal(query_id=query_id, key=b"default", letter=letter)


# A failed solve's window: one query refused now, one refused before (never sent).
REFUSED_WINDOW = PoolWindow(
    "default", 2, [], [], report=None, refused=[refusal("new")], resend_refused=[refusal("old")]
)


def sent_letters(producer: RecordingProducer) -> list[tuple[str, bytes | None, int | None]]:
    return [record for record in producer.sent if record[0] == "letters"]


async def test_a_refused_window_sends_its_letters_as_a_window_sends_assignments() -> None:
    """Transactions: the refusals' published markers and their dead letters, one commit."""
    published, producers, routed = publisher(fenced=False)
    assert await published.publish(REFUSED_WINDOW, lambda: True)
    assert producers.producer.sent == [
        (ROUTED, b"new", 2),
        (ROUTED, b"old", 2),
        ("letters", b"default", 0),  # the source record's key, as before
        ("letters", b"default", 0),  # a recorded refusal's letter re-sent unchanged
    ]
    assert all(value.startswith(PUBLISHED) for value in routed.data.values())


async def test_without_transactions_a_refusal_is_recorded_before_its_letter_is_sent() -> None:
    """Handed over after the refusal was recorded: the letter is left unsent, and the
    new owner reads the refusal (not a fresh query to solve again)."""
    records, routed = window_records()
    producer = RecordingProducer()
    acknowledged = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    assert not await acknowledged.publish(REFUSED_WINDOW, lambda: False)
    assert [(t, k) for t, k, _ in producer.sent] == [(ROUTED, b"new")]
    assert routed.data[b"new"].startswith(REFUSED)
    assert await acknowledged.publish(REFUSED_WINDOW, lambda: True)
    assert len(sent_letters(producer)) == 2
    assert all(value.startswith(PUBLISHED) for value in routed.data.values())


def test_a_refused_window_s_letters_are_the_recorded_ones() -> None:
    records, _ = window_records()
    letters = [r for r in records.outgoing(REFUSED_WINDOW) if r.topic == "letters"]
    assert [DeadLetter.model_validate_json(r.value) for r in letters] == [
        r.letter for r in REFUSED_WINDOW.letters
    ]
    assert REFUSED_WINDOW.keys == ["new", "old"]


@pytest.mark.parametrize("transactions", [True, False])
async def test_a_window_of_a_partition_the_decision_log_does_not_own_stops_the_router(
    transactions: bool,
) -> None:
    """A group mixing routers with and without cascade pools pairs omnirouter.probed's
    partitions apart from the changelogs': the decisions of such a window were
    dropped from memory as written (a probed query read again was escalated twice)."""
    records, routed = window_records()  # owns changelog partitions 0-3
    stray = PoolWindow("default", 5, [assignment("new")], [], report=None)
    producer = RecordingProducer()
    published: Publisher = (
        TransactionalPublisher(records, cast(PartitionProducers, Producers(fenced=False)))
        if transactions
        else AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    )
    with pytest.raises(RuntimeError, match="same cascade pools"):
        await published.publish(stray, lambda: True)
    assert producer.sent == [] and dict(routed.data) == {}


def test_a_decision_for_a_model_this_router_no_longer_routes_is_re_sent_to_its_topic() -> None:
    """Recorded (not yet sent) by a router that still routed the model, read again by
    one whose ROUTER_MODELS dropped it: the lookup by this router's models raised
    KeyError, and the router stopped on the same window at every start."""
    records, _ = window_records()
    gone = assignment("old").model_copy(update={"model": "org/retired-model"})
    window = PoolWindow("default", 2, [], [gone], report=None)
    [record] = records.outgoing(window)
    assert record.topic == model_topic("org/retired-model") == "omnirouter.route.org-retired-model"


def counted() -> tuple[float, float]:
    """The refused windows' dead letters and the assignments to model m counted so far."""
    letters = REGISTRY.get_sample_value(
        "omnirouter_dead_letters_total", {"topic": "omnirouter.predicted", "reason": "other"}
    )
    assigned = REGISTRY.get_sample_value(
        "omnirouter_assignments_total", {"model": "m", "pool": "default"}
    )
    return letters or 0.0, assigned or 0.0


# Assignments and refusals, decided now and before (never sent).
MIXED_WINDOW = PoolWindow(
    "default", 2, [assignment("new")], [assignment("old")], report=None,
    refused=[refusal("new-refused")], resend_refused=[refusal("old-refused")],
)  # fmt: skip


@pytest.mark.parametrize("fenced", [True, False])
async def test_a_window_s_letters_and_assignments_count_once_committed(fenced: bool) -> None:
    """Counted when the transaction commits, each letter and assignment sent (a
    recorded one re-sent as well: nothing counted it before); a fenced window
    counts nothing (its new owner sends and counts it)."""
    published, _, _ = publisher(fenced)
    before = counted()
    assert await published.publish(MIXED_WINDOW, lambda: False) is not fenced
    letters, assigned = (0, 0) if fenced else (2, 2)
    assert counted() == (before[0] + letters, before[1] + assigned)


async def test_without_transactions_a_window_handed_over_is_counted_by_its_next_owner() -> None:
    """Handed over after the decisions: nothing sent, nothing counted; the owner that
    re-sends them counts each once (before, the refusals were counted when built,
    also by a router that never sent them)."""
    records, _ = window_records()
    producer = RecordingProducer()
    acknowledged = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    before = counted()
    assert not await acknowledged.publish(MIXED_WINDOW, lambda: False)
    assert counted() == before
    resent = PoolWindow(
        "default", 2, [], MIXED_WINDOW.outgoing, report=None, resend_refused=MIXED_WINDOW.letters
    )
    assert await acknowledged.publish(resent, lambda: True)
    assert len(sent_letters(producer)) == 2
    assert counted() == (before[0] + 2, before[1] + 2)


async def test_without_transactions_a_report_written_with_its_decisions_is_counted_once() -> None:
    """The report goes out with the decisions: a window handed over right after is
    solved and billed, so counted; its next owner has nothing new to report."""
    records, _ = window_records()
    producer = cast(StartedOnFirstUse, Plain(RecordingProducer()))
    acknowledged = AcknowledgedPublisher(records, producer)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    report = WindowReport(
        window_id="w", pool="handed-over", window_start=start, window_end=start,
        query_count=1, mode="budget", window_budget_usd=1.0, predicted_spend_usd=0.1,
        predicted_mean_quality=0.5, solver="fast", solver_status="time_limited",
        solve_seconds=0.0, assignments_per_model={"m": 1},
    )  # fmt: skip
    labels = {"pool": "handed-over", "status": "time_limited"}
    window = PoolWindow("default", 2, [assignment("new")], [], report=report)
    assert not await acknowledged.publish(window, lambda: False)
    assert REGISTRY.get_sample_value("omnirouter_windows_total", labels) == 1
    resent = PoolWindow("default", 2, [], window.decided, report=None)
    assert await acknowledged.publish(resent, lambda: True)
    assert REGISTRY.get_sample_value("omnirouter_windows_total", labels) == 1


@pytest.mark.parametrize(
    ("mode", "budget", "matched"),
    [("budget", 1.0, 0.2), ("budget", None, 0.2), ("quality", None, 0.0)],
)
def test_a_budget_window_s_spend_is_expected_even_without_a_budget_in_its_report(
    mode: str, budget: float | None, matched: float
) -> None:
    """A cascade's escalations decided without a plan (no fitted cascade any more)
    report no budget, in a budget-mode pool: their realised cost was never matched
    against the predicted, so its error never reached the ledger."""
    tracked, _ = window_records()
    records = dataclasses.replace(tracked, spend=SpendTracker())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    report = WindowReport(
        window_id="w", pool="default", window_start=start,
        window_end=start + timedelta(seconds=5), query_count=1, mode=mode,
        window_budget_usd=budget, predicted_spend_usd=0.1, predicted_mean_quality=0.5,
        solver="none", solver_status="near_optimal", solve_seconds=0.0,
        assignments_per_model={"m": 1},
    )  # fmt: skip
    records.expect(PoolWindow("default", 2, [assignment("q")], [], report=report))
    assert records.spend is not None
    records.spend.observe("q", "m", 0.3)  # predicted 0.1
    assert records.spend.unbooked(2, "default") == pytest.approx(matched)
