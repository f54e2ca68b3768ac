"""Two ways to publish a pool's window, one promise: a decision is stored before
anyone can act on its assignment, and a router that lost the pool's partition
publishes nothing its successor does not know of.

- `AcknowledgedPublisher` (brokers without transactions): each decision is
  acknowledged by the broker before any assignment is sent, and the window is
  published only while this router's consumer generation is current; then the
  assignments, the published markers, the report and the ledger entry.
- `TransactionalPublisher` (KAFKA_TRANSACTIONS): the decision log's published
  markers, the assignments, the window report and the pool's ledger entry in
  one Kafka transaction of the partition's producer (fencing.py); a fenced
  router's window is aborted whole.
  Fenced with no rebalance begun (the broker aborted the transaction itself,
  after its timeout, say), the router stops with the batch unacknowledged
  rather than go on without a producer for the partition.

A query refused (its pool's solve failed) is published the same way: its
refusal entry holds its dead letter, which is one of the window's outgoing
records, sent where assignments are.

Either way the decision log ends with the assignments and dead letters marked
published, so a replayed window skips them. Both write the same records
(`WindowRecords`) with a plain aiokafka producer and keep the tables' in-memory
data in step. The metrics count here, once the broker has the records: a window's
report when it is written, its assignments and dead letters when they are marked
published, which happens once per query whichever router completes it (a window
left to the partition's new owner is counted by that owner, not twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from schemas import Assignment, ModelResponse, WindowReport
from workers.config import model_topic
from workers.routing.spend import SpendTracker
from workers.stream import metrics
from workers.stream.app import Topics
from workers.stream.codec import encode
from workers.stream.decision_log import DecisionLog, Refusal
from workers.stream.fencing import Fenced, PartitionProducers
from workers.stream.pool_ledger import PoolAccount, PoolLedger, after_escalations, after_window
from workers.stream.table_store import owns

# A cascade's escalation decisions are keyed apart from the query's first decision.
ESCALATION_KEY_PREFIX = "escalation:"

log = logging.getLogger(__name__)

# The producers' partitioner (aiokafka's default, named so the batches below place
# keyed records with the very function `producer.send` uses: one way of partitioning).
KEY_PARTITIONER = DefaultPartitioner()


@dataclass(frozen=True)
class PoolWindow:
    """What one pool's window publishes. Its queries share one partition of
    omnirouter.predicted, which is also the partition of the tables' changelogs."""

    pool: str
    partition: int
    decided: list[Assignment]  # decided now
    resend: list[Assignment]  # decided before, maybe never sent: sent unchanged
    report: WindowReport | None  # None when nothing was solved
    # An escalation window (cascade_stage.py): its decisions are keyed
    # "escalation:<query_id>", a decision of role "probe" accepts that probe's
    # answer (sent as one of `finals`, not as an assignment), and its report's
    # spend comes out of the pool's escalation reserve.
    stage: Literal["first", "escalation"] = "first"
    finals: list[ModelResponse] = field(default_factory=list)  # accepted probe answers
    # Queries refused (their pool's solve failed): their dead letters are their
    # outcome, recorded and sent as decisions and assignments are.
    refused: list[Refusal] = field(default_factory=list)  # refused now
    resend_refused: list[Refusal] = field(default_factory=list)  # before, maybe never sent

    @property
    def outgoing(self) -> list[Assignment]:
        return [*self.decided, *self.resend]

    @property
    def letters(self) -> list[Refusal]:
        return [*self.refused, *self.resend_refused]

    @property
    def key_prefix(self) -> str:
        return ESCALATION_KEY_PREFIX if self.stage == "escalation" else ""

    @property
    def keys(self) -> list[str]:
        """The decision log's keys of the window's queries."""
        query_ids = [*(a.query_id for a in self.outgoing), *(r.query_id for r in self.letters)]
        return list(dict.fromkeys(self.key_prefix + query_id for query_id in query_ids))

    @property
    def sent(self) -> list[Assignment]:
        """The assignments to send to the models (an accepted probe's is not one)."""
        if self.stage == "escalation":
            return [a for a in self.outgoing if a.role == "escalation"]
        return self.outgoing


def account_after(
    account: PoolAccount,
    window: PoolWindow,
    error_usd: float | None,
    now: datetime,
    reserve_seconds: float,
) -> PoolAccount:
    """The pool's account once the window is written at `now`; `error_usd`: the
    realised minus predicted spend a first-stage window books (None: spend
    correction is off); `reserve_seconds`: how long an escalation reserve lives."""
    assert window.report is not None
    if window.stage == "escalation":
        return after_escalations(account, window.report, now, reserve_seconds)
    return after_window(account, window.report, error_usd, now, reserve_seconds)


class Record(NamedTuple):
    topic: str
    value: bytes
    key: bytes | None  # None: a dead letter whose source had none (or too long a one)
    partition: int | None  # None: by the key


class LedgerEntry(NamedTuple):
    """The pool's ledger entry a window writes, and the spend error it books: once
    the entry is written, that error leaves the router's SpendTracker."""

    key: bytes
    value: bytes
    error_usd: float


@dataclass(frozen=True)
class WindowRecords:
    """The records a window writes, by kind; both publishers write them with a plain
    aiokafka producer (no Faust buffer or future per message)."""

    topics: Topics
    decisions: DecisionLog
    ledger: PoolLedger
    # Realised against predicted spend (workers/routing/spend.py); None: the
    # correction is off (ROUTER_SPEND_CORRECTION=false).
    spend: SpendTracker | None = None

    def check_owned(self, window: PoolWindow, still_current: Callable[[], bool]) -> None:
        """Stop the router when, with no rebalance begun, the window's partition is not
        its partition of the decision log: Faust pairs partitions of topics only among
        routers subscribed to the same topics, so a group mixing routers with and
        without cascade pools splits omnirouter.probed from the changelogs, and the
        decisions written would leave this router's memory at once (a probed query
        read again would be escalated twice)."""
        if still_current() and not owns(self.decisions.table, window.partition):
            raise RuntimeError(
                f"pool {window.pool}: partition {window.partition} of its records is not this "
                f"router's partition of {self.decisions.changelog}: the group's routers "
                "subscribe to different topics; every router of the group needs the same "
                'cascade pools (ROUTER_POOLS) and KAFKA_PARTITIONS (README "Upgrading routers")'
            )

    def entries(
        self, changelog: str, window: PoolWindow, pairs: list[tuple[bytes, bytes]]
    ) -> list[Record]:
        """A table's (key, value) entries, in the window's partition of its changelog."""
        return [Record(changelog, value, key, window.partition) for key, value in pairs]

    def decisions_of(self, window: PoolWindow) -> list[tuple[bytes, bytes]]:
        """The decision log's entries of what the window decided now: its queries'
        assignments and refusals."""
        decisions, prefix = self.decisions, window.key_prefix
        return [
            *decisions.decided_entries(window.decided, prefix),
            *decisions.refused_entries(window.refused, prefix),
        ]

    def outgoing(self, window: PoolWindow) -> list[Record]:
        """What the window's decisions send: the assignments, the accepted probe
        answers (final) of an escalation window and the refused queries' dead letters."""
        responses = self.topics.responses.get_topic_name() if window.finals else ""
        letters = self.topics.deadletter.get_topic_name() if window.letters else ""
        # The model's topic by its name, not by this router's ROUTER_MODELS: a decision
        # recorded by a router that still routed a model since removed is re-sent
        # where it was meant to go (a lookup raised KeyError at every restart).
        return [
            *(
                Record(model_topic(a.model), encode(a), a.query_id.encode(), None)
                for a in window.sent
            ),
            *(Record(responses, encode(r), r.query_id.encode(), None) for r in window.finals),
            *(Record(letters, encode(r.letter), r.key, None) for r in window.letters),
        ]

    def report(self, window: PoolWindow) -> tuple[list[Record], LedgerEntry | None]:
        """The window report and the pool's ledger entry, with that entry. Only a
        window with a report (decided now: a window read again after a crash has
        none) books the pool's spend error, and only a first-stage one."""
        if window.report is None:
            return [], None
        error: float | None = None
        if self.spend is not None:
            first = window.stage == "first"
            error = self.spend.unbooked(window.partition, window.pool) if first else 0.0
        account = account_after(
            self.ledger.account(window.pool),
            window,
            error,
            datetime.now(UTC),
            self.ledger.reserve_seconds,
        )
        key, value = self.ledger.entry(window.pool, account)
        windows = self.topics.windows.get_topic_name()
        return [
            Record(windows, encode(window.report), window.pool.encode(), None),
            *self.entries(self.ledger.changelog, window, [(key, value)]),
        ], LedgerEntry(key, value, error or 0.0)

    def expect(self, window: PoolWindow) -> None:
        """The assignments about to be sent: their predicted costs, for their outcomes
        to be matched with (workers/routing/spend.py). Called before they are sent,
        or an outcome read before the window's publishing ends would never match.
        Not for a quality-mode window: it has nothing to correct, and its entries
        would only fill the tracker. A budget-mode window whose report names no
        budget (a cascade's escalations decided without a plan) still spends."""
        report = window.report
        if self.spend is None or (report is not None and report.mode != "budget"):
            return
        for a in window.sent:
            self.spend.expect(window.partition, a.pool, a.query_id, a.model, a.predicted_cost_usd)

    def forget(self, window: PoolWindow) -> None:
        """The window was not published (left to the partition's new owner): its
        expected assignments are that owner's to expect and book."""
        if self.spend is not None:
            self.spend.forget((a.query_id, a.model) for a in window.sent)

    def remember(
        self,
        window: PoolWindow,
        entries: list[tuple[bytes, bytes]],
        ledger: LedgerEntry | None,
    ) -> None:
        """Update the tables' in-memory data with what was written to the window's
        partition of their changelogs; the spend error the ledger entry booked
        leaves the tracker (a window not written books nothing)."""
        self.decisions.remember(window.partition, entries)
        if ledger is not None:
            self.ledger.remember(window.partition, ledger.key, ledger.value)
            if self.spend is not None:
                self.spend.book(window.partition, window.pool, ledger.error_usd)


def observe_report(window: PoolWindow) -> None:
    """Count the window's report (if it has one): it is on the broker."""
    if window.report is not None:
        metrics.observe_report(window.report, own_budget=window.stage == "first")


def observe_published(window: PoolWindow) -> None:
    """Count what the window sent, now marked published: never sent again."""
    metrics.observe_assignments(window.pool, window.sent)
    metrics.observe_dead_letters(r.letter for r in window.letters)


async def send(producer: AIOKafkaProducer, records: list[Record]) -> list[asyncio.Future[Any]]:
    """Queue the records as record batches, one per topic partition (more while one
    would exceed the producer's batch size), each record's partition the one
    `producer.send` would give it, their order kept within each partition; each
    future is the broker's acknowledgement of a batch. aiokafka's batch API takes
    about half the CPU of a send per record (8 against 15 us), and a router sends
    about three records per query.

    A batch is closed when submitted, so the producer sends it on its next round
    rather than after its linger: every batch of a call goes out in one request."""
    by_partition: dict[tuple[str, int], list[Record]] = {}
    partitions: dict[str, list[int]] = {}
    for record in records:
        partition = record.partition
        if partition is None:
            if record.topic not in partitions:
                partitions[record.topic] = list(await producer.partitions_for(record.topic))
            partition = key_partition(record.key, partitions[record.topic])
        by_partition.setdefault((record.topic, partition), []).append(record)
    futures = []
    for (topic, partition), group in by_partition.items():
        for batch in filled_batches(producer, group):
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


def key_partition(key: bytes | None, partitions: list[int]) -> int:
    """The partition aiokafka's producer gives a keyed record (its default
    partitioner, over the topic's partitions as the producer lists them); an
    unkeyed one (a dead letter's, at times), a random partition, as it would."""
    return int(KEY_PARTITIONER(key, partitions, partitions))


def filled_batches(producer: AIOKafkaProducer, records: list[Record]) -> Iterator[Any]:
    """The records in order, in as few of the producer's record batches as hold them;
    each batch closed (so nothing else is added to it once submitted)."""
    batch = producer.create_batch()
    for record in records:
        if batch.append(key=record.key, value=record.value, timestamp=None) is None:
            yield batch  # full (append closed it)
            batch = producer.create_batch()
            batch.append(key=record.key, value=record.value, timestamp=None)  # a first fits
    batch.close()
    yield batch


async def delivered(producer: AIOKafkaProducer, records: list[Record]) -> None:
    await asyncio.gather(*await send(producer, records))


class Publisher(Protocol):
    async def publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        """Publish the window; False when it was left to the partition's new owner."""
        ...


class StartedOnFirstUse:
    """A plain producer, made and started when the first window is published (an
    aiokafka client belongs to the event loop it is made on: the worker's)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._options = dict(options)
        self._producer: AIOKafkaProducer | None = None

    async def get(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**self._options)
            await producer.start()
            self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


@dataclass(frozen=True)
class AcknowledgedPublisher:
    records: WindowRecords
    producer: StartedOnFirstUse

    async def publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        self.records.check_owned(window, still_current)
        async with self.records.ledger.lock(window.pool):
            return await self._publish(window, still_current)

    async def _publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        producer, decisions = await self.producer.get(), self.records.decisions
        decided = self.records.decisions_of(window)
        report, ledger = self.records.report(window)
        if decided:
            # The report and the ledger entry go with the decisions: a window re-read
            # after a crash or a hand-over finds every decision made, has nothing new
            # to report, and would otherwise never bill its time.
            entries = self.records.entries(decisions.changelog, window, decided)
            await delivered(producer, [*entries, *report])
            # A crash from here re-sends it unchanged.
            self.records.remember(window, decided, ledger)
            observe_report(window)
            report, ledger = [], None
            if not still_current():
                return False
        # Expected before they are sent (an outcome may be read before this returns);
        # from here the window is published or the router stops: nothing to forget.
        self.records.expect(window)
        await delivered(producer, self.records.outgoing(window))
        published = decisions.published_entries(window.keys, window.partition, time.time())
        await delivered(
            producer, [*self.records.entries(decisions.changelog, window, published), *report]
        )
        self.records.remember(window, published, ledger)
        if report:  # written now, not with decisions
            observe_report(window)
        observe_published(window)
        return True


@dataclass(frozen=True)
class TransactionalPublisher:
    records: WindowRecords
    producers: PartitionProducers

    async def publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        self.records.check_owned(window, still_current)
        async with self.records.ledger.lock(window.pool):
            return await self._publish(window, still_current)

    async def _publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        # Committed together, a decision and its assignment (or a refusal and its
        # dead letter) need no "decided" step:
        # the entry is the published marker from the start (read_committed recovery
        # never sees an aborted one).
        decisions = self.records.decisions
        published = decisions.published_entries(window.keys, window.partition, time.time())
        report, ledger = self.records.report(window)
        records = [
            *self.records.entries(decisions.changelog, window, published),
            *self.records.outgoing(window),
            *report,
        ]
        self.records.expect(window)  # before it is sent; forgotten if it is not published
        try:
            async with self.producers.transaction(window.partition) as producer:
                await send(producer, records)  # the commit waits for every ack
        except Fenced as exc:
            self.records.forget(window)
            if still_current():  # fenced by no rebalance this router knows of: stop
                raise RuntimeError(f"pool {window.pool}: {exc} outside a rebalance") from exc
            log.warning("pool %s: %s; its window is left to the new owner", window.pool, exc)
            return False
        except BaseException:
            self.records.forget(window)  # aborted: nothing was published
            raise
        self.records.remember(window, published, ledger)
        observe_report(window)
        observe_published(window)
        return True
