"""The persistent local broker keeps what it acknowledged across a restart.

The broker-restart fault test rests on this: messages, a consumer group's committed
offsets and committed transactions are still there after `restart()` (SIGTERM, then a
new process on the same port and data directory), and clients can use the broker
as soon as `restart()` returns.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.integration.test_broker_features import (
    create_topic,
    read_committed,
    transactional_producer,
)
from workers.services import PersistentLocalBroker
from workers.stream.kafka_io import produce_values, read_topic

pytestmark = pytest.mark.integration

GROUP = "restart-check"


async def consume_and_commit(bootstrap: str, topic: str, count: int) -> None:
    """One consumer of GROUP reads `count` records and commits (the broker's groups
    settle with one member committing; see PersistentLocalBroker)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        taken = 0
        while taken < count:
            batch = await consumer.getmany(timeout_ms=5000, max_records=count - taken)
            taken += sum(len(records) for records in batch.values())
        await consumer.commit()
    finally:
        await consumer.stop()


async def committed(bootstrap: str, partition: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP)
    await consumer.start()
    try:
        return await consumer.committed(partition)
    finally:
        await consumer.stop()


async def commit_a_transaction(bootstrap: str, topic: str) -> None:
    producer = transactional_producer(bootstrap, "restart-check")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed before the restart")
    finally:
        await producer.stop()


def test_a_restart_keeps_messages_group_offsets_and_transactions(
    persistent_broker: PersistentLocalBroker,
) -> None:
    bootstrap, topic, partition = (
        persistent_broker.bootstrap_servers,
        "kept",
        TopicPartition("kept", 0),
    )
    asyncio.run(create_topic(bootstrap, topic))
    asyncio.run(create_topic(bootstrap, "kept-txn"))
    values = [(f"k{i}", f"message {i}") for i in range(100)]
    asyncio.run(produce_values(bootstrap, topic, values))
    asyncio.run(consume_and_commit(bootstrap, topic, 60))
    asyncio.run(commit_a_transaction(bootstrap, "kept-txn"))
    before = persistent_broker.pid

    persistent_broker.restart()

    assert persistent_broker.pid != before  # a new process, not the old one left running
    assert asyncio.run(read_topic(bootstrap, topic)) == [v.encode() for _, v in values]
    assert asyncio.run(committed(bootstrap, partition)) == 60
    assert asyncio.run(read_committed(bootstrap, "kept-txn")) == [b"committed before the restart"]
