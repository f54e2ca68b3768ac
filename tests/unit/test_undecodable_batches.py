"""Reading fetched records past batches that cannot be decoded (transport.py), on
aiokafka's own record parsing of real v2 record batches, and their dead letters."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.record.memory_records import MemoryRecords
from faust.types import TP
from prometheus_client import REGISTRY

from tests.record_batches import ZSTD, record_batch
from workers.stream.transport import Consumer, SkippingUndecodable, UndecodableBatch

PARTITION = TP("omnirouter.queries", 0)


def batch(base_offset: int, count: int, *, claimed_codec: int = 0, crc_flip: int = 0) -> bytes:
    """`count` records from `base_offset`, their values v0, v1, ..."""
    values = [b"v%d" % delta for delta in range(count)]
    return record_batch(
        values, base_offset=base_offset, claimed_codec=claimed_codec, crc_flip=crc_flip
    )


def read(fetched: bytes, fetch_offset: int) -> tuple[list[int], list[UndecodableBatch], int]:
    """The offsets read, the batches reported, and the partition's next fetch offset."""
    records = PartitionRecords(
        PARTITION, MemoryRecords(fetched), [], fetch_offset, None, None, True, READ_UNCOMMITTED
    )
    reported: list[UndecodableBatch] = []
    skipping = SkippingUndecodable(PARTITION, records, reported.append)
    offsets = [record.offset for record in skipping]
    return offsets, reported, skipping.next_fetch_offset


def test_a_batch_with_a_wrong_crc_is_reported_and_the_next_batches_are_read() -> None:
    fetched = batch(0, 3) + batch(3, 4, crc_flip=1) + batch(7, 2)
    offsets, reported, next_offset = read(fetched, 0)
    assert offsets == [0, 1, 2, 7, 8]
    ((tp, first, last, reason),) = reported
    assert (tp, first, last) == (PARTITION, 3, 6)
    assert "CorruptRecordException" in reason and "CRC" in reason
    assert next_offset == 9


def test_a_payload_its_codec_cannot_read_is_skipped_also_as_the_last_batch() -> None:
    offsets, reported, next_offset = read(batch(10, 2) + batch(12, 3, claimed_codec=ZSTD), 10)
    assert offsets == [10, 11]
    assert [(b.first, b.last) for b in reported] == [(12, 14)]
    assert next_offset == 15  # the next fetch starts past it: no refetch, no loop


def test_a_codec_this_client_cannot_read_is_reported_not_raised() -> None:
    """Codec 7 names no codec (a newer one, say): aiokafka's UnsupportedCodecError, as
    for a codec whose library is missing."""
    offsets, reported, next_offset = read(batch(0, 1) + batch(1, 2, claimed_codec=7), 0)
    assert offsets == [0] and next_offset == 3
    ((_, first, last, reason),) = reported
    assert (first, last) == (1, 2) and "UnsupportedCodecError" in reason


def test_a_fetch_that_starts_inside_a_bad_batch_reports_from_its_position() -> None:
    offsets, reported, next_offset = read(batch(20, 5, crc_flip=1) + batch(25, 1), 22)
    assert offsets == [25]
    assert [(b.first, b.last) for b in reported] == [(22, 24)]
    assert next_offset == 26


def test_good_batches_are_read_as_aiokafka_reads_them() -> None:
    offsets, reported, next_offset = read(batch(0, 2) + batch(2, 2), 1)
    assert (offsets, reported, next_offset) == ([1, 2, 3], [], 4)


@dataclass
class FlakyDeadLetterTopic:
    """A dead-letter topic whose first send fails (the broker out of reach)."""

    sent: list[bytes] = field(default_factory=list)
    calls: int = 0

    async def send(self, *, value: bytes) -> asyncio.Future[None]:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("broker unavailable")
        self.sent.append(value)
        acknowledged = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


async def test_an_undecodable_batch_s_letter_is_counted_once_when_its_send_is_retried() -> None:
    """The first send fails and is retried after the next fetch: one letter sent, one
    counted (before, the count came before the send: two)."""
    consumer: Any = Consumer.__new__(Consumer)
    bad = UndecodableBatch(PARTITION, 3, 6, "undecodable record batch: CorruptRecordException")
    consumer._thread = SimpleNamespace(undecodable=collections.deque([bad]))
    consumer._dead_lettered_to = {}
    consumer._deadletter = topic = FlakyDeadLetterTopic()
    gaps: list[tuple[TP, int, int]] = []

    async def add_gap(tp: TP, first: int, last: int) -> None:
        gaps.append((tp, first, last))

    consumer._add_gap = add_gap
    labels = {"topic": PARTITION.topic, "reason": "undecodable"}
    before = REGISTRY.get_sample_value("omnirouter_dead_letters_total", labels) or 0.0
    await consumer._dead_letter_undecodable()  # fails: retried after the next fetch
    assert (topic.sent, gaps) == ([], [])
    await consumer._dead_letter_undecodable()
    assert len(topic.sent) == 1 and gaps == [(PARTITION, 3, 6)]
    assert REGISTRY.get_sample_value("omnirouter_dead_letters_total", labels) == before + 1
