"""Faust's aiokafka transport, with fixes the router's guarantees rely on.

1. A configurable fetch wait. Faust fixes its consumers' fetch_max_wait_ms at
   1,500 ms. Apache Kafka answers a fetch as soon as data arrives, but some
   Kafka-compatible brokers (the local Tansu broker among them) hold every
   fetch for the whole wait, which adds up to 1.5 s to each hop of the
   pipeline. The wait comes from KAFKA_FETCH_MAX_WAIT_MS instead.
2. No skipped records on a partition that has no committed offset yet. While
   a worker recovers its tables after a rebalance, Faust drops the records its
   fetcher returns and afterwards seeks each partition back to its committed
   offset; a partition with none (a worker killed before its first commit) was
   left where the fetcher stopped, past records nobody processed. Such a
   partition is now sent back to its beginning, as `auto_offset_reset=earliest`
   promises (found by tests/integration/test_crash_recovery.py).
3. No skipped records after the seek either. Faust's fetch loop hands a
   fetched batch out record by record and marks each one read once its stream
   took it (while a rebalance holds the flow, at once and to nobody). A batch
   still being handed out when the seek back to the committed offsets ran went
   on marking its records read after it: the refetched records then looked
   already read and were dropped, and the jump from the committed offset to
   the next record handed out was booked as a gap, which Faust counts as
   acknowledged, so the group's committed offset moved past queries nobody
   routed (hundreds in one run of four with several routers; a broker restart
   lost 14-188 of 300 in one run of three). Records are therefore handed out
   under a lock a seek takes: a seek waits for the record in flight, the batch
   stops there, and no record is handed out while the seek runs.
4. No crash on a record batch that cannot be decoded (a CRC that does not
   match, a codec whose library is missing, a payload its codec cannot
   decompress). aiokafka raises while Faust's consumer thread drains the fetched
   records, which stopped the worker, and every worker given that partition after
   it: a crash loop, nothing routed any more. Each partition's fetched records are
   now read through `SkippingUndecodable`: such a batch is skipped (the
   partition's position moves past it, as past any read batch) and reported; the
   consumer sends a dead letter with the reason and the batch's offsets, waits
   for the broker's acknowledgement, and only then counts those offsets as done
   (Faust's gap mechanism), so the group's committed offset passes the batch only
   once its dead letter is stored. Records fetched for other partitions in the
   same call are kept (before, an error there lost them after their position had
   moved on).
5. Changelog ends are where the last readable record is. Some Kafka-compatible
   brokers (the local Tansu broker among them) answer a partition's end offset
   with the start of its last record batch + 1, not its end; and a partition
   written in transactions ends with a commit or abort marker, which no
   consumer is ever handed. Faust recovers a table until it has been handed
   the record before the end it was given, so a restarted router missed the
   last decisions of its changelog, crashed on Faust's consistency check
   ("persisted offset ... is higher than the last offset in that topic"), or
   would wait forever behind a marker. The end is therefore found by reading
   the partition's tail (`_readable_ends`): one past the last record a
   read-committed consumer is handed.
6. Committed records only. Every worker reads with isolation level
   read_committed: a router's window written in a transaction (fencing.py) is
   seen whole or, if the transaction was aborted (a fenced router), not at all.
   On a broker without transactions this reads exactly what it did before.
7. A hook before an assignment is handled (`BEFORE_ASSIGNMENT_ATTRIBUTE`): the
   router fences the previous owners of its new partitions there, before Faust
   recovers its tables from their changelogs.
8. Fewer tasks per record. Faust's fetch loop hands each record to its streams
   with `wait_first(callback(message), suspend_flow.wait())`: four tasks per
   record (the callback, the flow's suspension, the consumer's stop and crash),
   the largest item of a busy router's event loop. The callback almost always
   finishes without waiting (the flow runs, no buffer is full), so it is run at
   once (`Consumer.wait_first`); one that has to wait goes on as a task racing
   the flow's suspension and the consumer's stop as before.

The transport is registered for the URL scheme `omnikafka://` through Faust's
`faust.transports` entry point; make_app uses it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from functools import partial
from typing import Any, NamedTuple, cast

import aiokafka
from aiokafka.consumer.fetcher import FetchResult, PartitionRecords
from aiokafka.structs import ConsumerRecord
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message, TopicT
from mode import Service
from mode.services import WaitResults

from workers.config import get_settings
from workers.stream import metrics
from workers.stream.codec import encode, undecodable_batch_letter

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_ATTRIBUTE = "omnirouter_fetch_max_wait_ms"
# On the app: async callables given the new assignment before Faust handles it.
BEFORE_ASSIGNMENT_ATTRIBUTE = "omnirouter_before_assignment"
END_PROBE_TIMEOUT_SECONDS = 10.0
READ_COMMITTED = "read_committed"


class UndecodableBatch(NamedTuple):
    """Offsets `first`..`last` of a partition, skipped because their batch could not be decoded."""

    tp: TP
    first: int
    last: int
    reason: str


class _BatchesSeen:
    """The record batches of one fetched response (aiokafka's MemoryRecords), keeping
    the one handed out last: the batch a decoding error comes from."""

    def __init__(self, records: Any) -> None:
        self._records = records
        self.last: Any = None

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        self.last = None  # unknown, should reading the next one fail
        self.last = self._records.next_batch()
        return self.last

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())


class SkippingUndecodable:
    """aiokafka's records of one fetched partition (PartitionRecords), read on past any
    batch that cannot be decoded: that batch is reported and skipped, and the
    partition's next fetch offset moves past it."""

    def __init__(
        self, tp: TP, records: PartitionRecords, report: Callable[[UndecodableBatch], None]
    ) -> None:
        self._tp = tp
        self._records = records
        self._batches = _BatchesSeen(records._records)
        records._records = self._batches  # its iterator reads them from its first step on
        self._report = report

    @property
    def next_fetch_offset(self) -> int:
        return int(self._records.next_fetch_offset)

    def __iter__(self) -> SkippingUndecodable:
        return self

    def __next__(self) -> ConsumerRecord[Any, Any]:
        while True:
            try:
                return next(self._records)
            except StopIteration:
                raise
            # Anything but the end: CorruptRecordException (a CRC), UnsupportedCodecError
            # (no library for the codec), the codec library's own DecompressionError...
            except Exception as exc:
                self._skip(exc)

    def _skip(self, exc: Exception) -> None:
        first = self.next_fetch_offset
        batch = self._batches.last
        # Without the batch (the response's framing itself is broken) step one offset:
        # the next fetch starts after it.
        after = int(batch.next_offset) if batch is not None else first + 1
        reason = f"undecodable record batch: {type(exc).__name__}: {exc}"
        self._report(UndecodableBatch(self._tp, first, after - 1, reason))
        self._records.next_fetch_offset = after
        if batch is None:
            raise StopIteration
        self._records._records_iterator = self._records._unpack_records()  # the next batch on


class _GuardedFetchResults(collections.OrderedDict[TP, Any]):
    """aiokafka's fetcher's table of fetched results by partition (`Fetcher._records`),
    each partition's records wrapped in SkippingUndecodable as they arrive."""

    def __init__(self, report: Callable[[UndecodableBatch], None]) -> None:
        super().__init__()
        self._report = report

    def __setitem__(self, tp: TP, result: Any) -> None:
        if type(result) is FetchResult and isinstance(result._partition_records, PartitionRecords):
            result._partition_records = SkippingUndecodable(
                tp, result._partition_records, self._report
            )
        super().__setitem__(tp, result)


async def readable_ends(
    probe: aiokafka.AIOKafkaConsumer, reported: Mapping[TP, int]
) -> dict[TP, int]:
    """Each partition's end as one past the last record `probe` (a started
    read-committed consumer) is handed: a partition written in transactions ends
    with a commit marker, which no consumer is handed. A partition with no such
    record ends where it begins; one reported empty stays so."""
    ends = dict(reported)
    pending = [tp for tp, end in reported.items() if end]
    if pending:
        probe.assign(pending)
        beginnings = await probe.beginning_offsets(pending)
        for tp in pending:
            ends[tp] = await _last_readable(probe, tp, beginnings[tp], reported[tp]) + 1
    return ends


async def _last_readable(
    probe: aiokafka.AIOKafkaConsumer, tp: TP, beginning: int, reported_end: int
) -> int:
    """The offset of the partition's last record the probe is handed (beginning - 1
    when there is none): its tail read from `reported_end - 1`, then from four
    times as far back while the tail holds only markers or aborted records."""
    deadline = time.monotonic() + END_PROBE_TIMEOUT_SECONDS
    span = 1
    while True:
        start = max(beginning, reported_end - span)
        last = await _last_from(probe, tp, start, deadline)
        if last is not None or start == beginning:
            return beginning - 1 if last is None else last
        span *= 4


async def _last_from(
    probe: aiokafka.AIOKafkaConsumer, tp: TP, start: int, deadline: float
) -> int | None:
    """The offset of the last record handed out from `start` to the partition's end."""
    probe.seek(tp, start)
    last: int | None = None
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the end of {tp.topic}[{tp.partition}] could not be read")
        fetched = await probe.getmany(tp, timeout_ms=200)
        for record in fetched.get(tp, []):
            last = record.offset if last is None else max(last, record.offset)
        end = probe.last_stable_offset(tp)
        if end is not None and await probe.position(tp) >= end:
            return last


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Appended on this thread, taken by the Consumer on the app's (deques are thread-safe).
        self.undecodable: collections.deque[UndecodableBatch] = collections.deque()

    async def on_start(self) -> None:
        await super().on_start()
        fetcher = self._ensure_consumer()._fetcher
        guarded = _GuardedFetchResults(self.undecodable.append)
        for tp, result in fetcher._records.items():
            guarded[tp] = result
        fetcher._records = guarded

    def _create_worker_consumer(self, *args: Any, **kwargs: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(*args, **kwargs)
        # Both are read by the consumer when it starts its fetcher.
        consumer._fetch_max_wait_ms = getattr(self.app, FETCH_MAX_WAIT_ATTRIBUTE, 1500)
        consumer._isolation_level = READ_COMMITTED
        return consumer

    async def _highwaters(self, partitions: Iterable[TP]) -> Mapping[TP, int]:
        reported = await super()._highwaters(list(partitions))
        return await self._readable_ends(reported)

    async def _readable_ends(self, reported: Mapping[TP, int]) -> dict[TP, int]:
        """Each partition's end as one past the last record a read-committed consumer
        is handed, read from the partition's tail on a consumer of no group (so
        nothing is committed or rebalanced); a partition with no such record ends
        where it begins."""
        if not any(reported.values()):
            return dict(reported)
        probe = self._create_client_consumer(cast(faust_aiokafka.Transport, self.transport))
        probe._isolation_level = READ_COMMITTED
        await probe.start()
        try:
            return await readable_ends(probe, reported)
        finally:
            await probe.stop()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        changelogs = self.app.tables.changelog_topics
        never_committed = [
            tp for tp, offset in committed.items() if offset is None and tp.topic not in changelogs
        ]
        if never_committed:
            await self.seek_to_beginning(*never_committed)
        return committed


class _Resumed:
    """A coroutine already run up to its first wait (`waiting_on`, what it yielded),
    finished by whatever awaits this: everything sent or thrown in goes on to it."""

    def __init__(self, coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, waiting_on = self._coroutine, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as exc:  # a cancellation, say: the coroutine handles it
                step = partial(coroutine.throw, exc)
            else:
                step = partial(coroutine.send, sent)
            try:
                waiting_on = step()
            except StopIteration as finished:
                return finished.value


def _close(awaitables: Iterable[Any]) -> None:
    """Close coroutines that will never run (no "never awaited" warning)."""
    for awaitable in awaitables:
        if inspect.iscoroutine(awaitable):
            awaitable.close()


class FirstRunAtOnce(Service):
    """mode's `Service.wait_first` (what the first of `coros` to finish gave, unless
    the service stopped), with the first coroutine run at once: when it finishes
    without waiting no task is made; otherwise it goes on as a task, racing the
    others as before (item 8 of the module's docstring)."""

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        first, *others = coros
        if not inspect.iscoroutine(first) or timeout is not None or self._stopping():
            return await super().wait_first(*coros, timeout=timeout)
        try:
            waiting_on = first.send(None)
        except StopIteration as finished:
            _close(others)
            if self._stopping():
                return WaitResults([], [], True)
            return WaitResults([first], [finished.value], False)
        except BaseException:
            _close(others)
            raise
        return await super().wait_first(_Resumed(first, waiting_on), *others)

    def _stopping(self) -> bool:
        return bool(self._stopped.is_set() or self._crashed.is_set())


class Consumer(FirstRunAtOnce, faust_aiokafka.Consumer):
    _thread: ConsumerThread
    _deadletter: TopicT | None = None
    # partition -> last offset this process sent a dead letter for: a batch fetched
    # again (a seek back to the committed offset) is not dead-lettered twice.
    _dead_lettered_to: dict[TP, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dead_lettered_to = {}
        self._handing_out = asyncio.Lock()
        self._handing_out_task: asyncio.Task[Any] | None = None
        self._seeks_waiting = 0

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        for hook in getattr(self.app, BEFORE_ASSIGNMENT_ATTRIBUTE, ()):
            await hook(assigned)
        await super().on_partitions_assigned(assigned, generation_id)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        records = await super()._getmany(active_partitions, timeout)
        await self._dead_letter_undecodable()
        return records

    async def _dead_letter_undecodable(self) -> None:
        """A dead letter for each batch the thread skipped, acknowledged by the broker
        before its offsets count as done; one that cannot be sent now waits for the
        next fetch (and holds the group's committed offset before it meanwhile)."""
        pending = self._thread.undecodable
        while pending:
            batch = pending[0]
            try:
                if batch.last > self._dead_lettered_to.get(batch.tp, -1):
                    await self._send_dead_letter(batch)
                    self._dead_lettered_to[batch.tp] = batch.last
            except Exception:
                log.exception("dead letter for %s not sent; retried after the next fetch", batch)
                return
            pending.popleft()
            await self._add_gap(batch.tp, batch.first, batch.last)

    async def _send_dead_letter(self, batch: UndecodableBatch) -> None:
        tp = batch.tp
        log.warning(
            "dead letter from %s[%d]@%d-%d: %s",
            tp.topic, tp.partition, batch.first, batch.last, batch.reason,
        )  # fmt: skip
        letter = undecodable_batch_letter(
            tp.topic, tp.partition, batch.first, batch.last, batch.reason
        )
        sent = await self._deadletter_topic().send(value=encode(letter))
        await sent
        metrics.observe_dead_letters([letter])  # once sent: a failed send is retried

    def _deadletter_topic(self) -> TopicT:
        if self._deadletter is None:
            self._deadletter = self.app.topic(
                get_settings().topic_names()["deadletter"],
                key_serializer="raw",
                value_serializer="raw",
            )
        return self._deadletter

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """Faust's batch of records, handed out under the lock a seek takes, and cut
        short after the record in flight once a seek waits for it."""
        async with self._handing_out:
            self._handing_out_task = asyncio.current_task()
            try:
                async for tp, message in super().getmany(timeout):
                    yield tp, message  # the fetch loop delivers it and marks it read
                    if self._seeks_waiting:
                        break  # the rest is fetched again from the seek's position
            finally:
                self._handing_out_task = None

    async def perform_seek(self) -> None:
        """Seek every partition back to its committed offset with no record in hand."""
        if self._handing_out_task is asyncio.current_task():
            # Faust's getmany seeks itself while the flow is stopped: nothing in hand.
            await super().perform_seek()
            return
        self._seeks_waiting += 1
        try:
            async with self._handing_out:
                await super().perform_seek()
        finally:
            self._seeks_waiting -= 1


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
