"""Transactions, asked of real brokers, and the fencing the router will rely on.

`supports_transactions` must tell the persistent broker (noida-db, which answers
InitProducerId) from the memory-only one (Tansu, which does not), quickly. On the
broker that has them, transactions must do what fencing a router needs: a producer
whose transactional id a newer one has taken cannot commit, a read_committed
consumer sees only committed messages, and consumed offsets commit with what was
produced, or not at all.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import InvalidProducerEpoch, KafkaConnectionError, ProducerFenced

from workers.config import Settings
from workers.services import LocalBroker, PersistentLocalBroker, free_port
from workers.stream.broker_features import (
    TransactionsUnavailable,
    supports_transactions,
    use_transactions,
)
from workers.stream.kafka_io import produce_values

pytestmark = pytest.mark.integration

PROBE_SECONDS = 2.0


def timed_probe(bootstrap: str) -> tuple[bool, float]:
    started = time.monotonic()
    answer = asyncio.run(supports_transactions(bootstrap, timeout_seconds=PROBE_SECONDS))
    return answer, time.monotonic() - started


def test_the_persistent_broker_supports_transactions(
    persistent_broker: PersistentLocalBroker,
) -> None:
    answer, seconds = timed_probe(persistent_broker.bootstrap_servers)
    print(f"noida-db: supports_transactions {answer} in {seconds:.3f}s")
    assert answer is True
    assert seconds < PROBE_SECONDS


def test_the_memory_only_broker_does_not_and_says_so_quickly() -> None:
    with LocalBroker() as broker:
        answer, seconds = timed_probe(broker.bootstrap_servers)
    print(f"Tansu: supports_transactions {answer} in {seconds:.3f}s")
    assert answer is False
    assert seconds < PROBE_SECONDS + 1  # the deadline holds, whatever the broker does


def test_a_broker_that_cannot_be_reached_is_an_error_not_a_no() -> None:
    with pytest.raises(KafkaConnectionError):
        timed_probe(f"127.0.0.1:{free_port()}")


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def read_committed(bootstrap: str, topic: str) -> list[bytes]:
    """Every committed value of a one-partition topic, up to its last stable offset."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", group_id=None
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]  # the last stable offset
        values: list[bytes] = []
        while await consumer.position(partition) < end:
            batch = await consumer.getmany(partition, timeout_ms=500)
            values.extend(r.value for r in batch.get(partition, []) if r.value is not None)
        return values
    finally:
        await consumer.stop()


def transactional_producer(bootstrap: str, transactional_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)


async def fence_the_older_producer(bootstrap: str, topic: str) -> None:
    """The older producer sends inside a transaction; a newer one with the same
    transactional id starts, sends and commits; the older one's commit must fail."""
    transactional_id = f"router-{uuid.uuid4().hex[:6]}"
    older = transactional_producer(bootstrap, transactional_id)
    newer = transactional_producer(bootstrap, transactional_id)
    await older.start()
    try:
        await older.begin_transaction()
        await older.send_and_wait(topic, b"from the older router")  # in the log, uncommitted
        await newer.start()  # InitProducerId: a new epoch, the older one's transaction aborted
        async with newer.transaction():
            await newer.send_and_wait(topic, b"from the newer router")
        with pytest.raises((ProducerFenced, InvalidProducerEpoch)):
            await older.commit_transaction()
    finally:
        await asyncio.gather(older.stop(), newer.stop())


def test_a_producer_whose_transactional_id_was_taken_cannot_commit(
    persistent_broker: PersistentLocalBroker,
) -> None:
    bootstrap, topic = persistent_broker.bootstrap_servers, "fenced"
    asyncio.run(create_topic(bootstrap, topic))
    asyncio.run(fence_the_older_producer(bootstrap, topic))
    assert asyncio.run(read_committed(bootstrap, topic)) == [b"from the newer router"]


async def consume_and_forward(
    bootstrap: str, source: str, sink: str, group: str, commit: bool
) -> None:
    """Read everything in `source`, forward it to `sink` and hand the consumed offsets
    to the same transaction; commit it or abort it."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = transactional_producer(bootstrap, f"forwarder-{group}")
    await asyncio.gather(consumer.start(), producer.start())
    try:
        batch = await consumer.getmany(timeout_ms=5000, max_records=1000)
        records = [r for rs in batch.values() for r in rs]
        await producer.begin_transaction()
        for record in records:
            await producer.send_and_wait(sink, record.value, key=record.key)
        offsets = {tp: rs[-1].offset + 1 for tp, rs in batch.items()}
        await producer.send_offsets_to_transaction(offsets, group)
        if commit:
            await producer.commit_transaction()
        else:
            await producer.abort_transaction()
    finally:
        await asyncio.gather(consumer.stop(), producer.stop())


async def committed_offset(bootstrap: str, group: str, partition: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return await consumer.committed(partition)
    finally:
        await consumer.stop()


def test_consumed_offsets_commit_with_the_produced_messages_or_not_at_all(
    persistent_broker: PersistentLocalBroker,
) -> None:
    bootstrap, group = persistent_broker.bootstrap_servers, "forwarder"
    source, sink = TopicPartition("source", 0), "sink"
    for topic in (source.topic, sink):
        asyncio.run(create_topic(bootstrap, topic))
    asyncio.run(
        produce_values(bootstrap, source.topic, [(f"q{i}", f"query {i}") for i in range(20)])
    )

    asyncio.run(consume_and_forward(bootstrap, source.topic, sink, group, commit=False))
    assert asyncio.run(committed_offset(bootstrap, group, source)) is None
    assert asyncio.run(read_committed(bootstrap, sink)) == []

    asyncio.run(consume_and_forward(bootstrap, source.topic, sink, group, commit=True))
    assert asyncio.run(committed_offset(bootstrap, group, source)) == 20
    forwarded = asyncio.run(read_committed(bootstrap, sink))
    assert forwarded == [f"query {i}".encode() for i in range(20)]


def test_kafka_transactions_on_is_refused_by_a_broker_without_them() -> None:
    with LocalBroker() as broker:
        with pytest.raises(TransactionsUnavailable, match="KAFKA_TRANSACTIONS=on"):
            asyncio.run(
                use_transactions(Settings(kafka_transactions="on"), broker.bootstrap_servers)
            )
        auto = asyncio.run(
            use_transactions(Settings(kafka_transactions="auto"), broker.bootstrap_servers)
        )
    assert auto is False  # auto falls back to generation-checked decisions


def test_kafka_transactions_auto_uses_them_where_the_broker_has_them(
    persistent_broker: PersistentLocalBroker,
) -> None:
    bootstrap = persistent_broker.bootstrap_servers
    assert asyncio.run(use_transactions(Settings(kafka_transactions="auto"), bootstrap))
    assert not asyncio.run(use_transactions(Settings(kafka_transactions="off"), bootstrap))


def test_kafka_transactions_off_never_asks_the_broker() -> None:
    unreachable = f"127.0.0.1:{free_port()}"
    assert not asyncio.run(use_transactions(Settings(kafka_transactions="off"), unreachable))
