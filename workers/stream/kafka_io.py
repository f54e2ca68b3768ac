"""Plain aiokafka producing and reading, for commands and tests outside the Faust app.

`security` is workers.stream.security.aiokafka_options for a secured cluster."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


async def produce_values(
    bootstrap_servers: str,
    topic: str,
    keyed_values: Sequence[tuple[str, str | bytes]],
    security: Mapping[str, Any] | None = None,
) -> None:
    """Send (key, value) pairs and wait until the broker acknowledged every one."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", **(security or {}))
    await producer.start()
    try:
        sends = [
            await producer.send(
                topic,
                key=key.encode(),
                value=value if isinstance(value, bytes) else value.encode(),
            )
            for key, value in keyed_values
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def consume_values(
    bootstrap_servers: str,
    topic: str,
    expected: int,
    timeout_seconds: float = 30.0,
    security: Mapping[str, Any] | None = None,
) -> list[bytes]:
    """Read a topic from the beginning until `expected` values arrived or time ran out."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"omnirouter-reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **(security or {}),
    )
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_seconds
    try:
        while len(values) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                values.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return values


async def topic_partitions(
    consumer: AIOKafkaConsumer, topics: Sequence[str]
) -> list[TopicPartition]:
    """Every partition of the topics, from the cluster's metadata."""
    await consumer.topics()  # fetches the cluster's metadata
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or [])
    ]


async def read_records(
    bootstrap_servers: str,
    topics: list[str],
    timeout_seconds: float = 30.0,
    security: Mapping[str, Any] | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record the topics hold now (a fenced router's aborted window
    is not there), from the beginning of each partition to its end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        **(security or {}),
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        partitions = await topic_partitions(consumer, topics)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            batches = await consumer.getmany(*partitions, timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
            # A fetch also reports each partition's end (its last stable offset: the
            # start of a transaction still open, else the high watermark); the Tansu
            # broker answers end_offsets with the start of the last batch + 1.
            ends = {tp: max(end, consumer.last_stable_offset(tp) or 0) for tp, end in ends.items()}
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
    finally:
        await consumer.stop()
    return records


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    timeout_seconds: float = 30.0,
    security: Mapping[str, Any] | None = None,
) -> list[bytes]:
    """Every value the topic holds now."""
    records = await read_records(bootstrap_servers, [topic], timeout_seconds, security)
    return [r.value for r in records if r.value is not None]


async def group_state(
    bootstrap_servers: str, group: str, security: Mapping[str, Any] | None = None
) -> tuple[str, int]:
    """A consumer group's state as the broker reports it ("Stable", "Empty", ...) and
    its number of members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(security or {}))
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        _, _, state, _, _, members = response.groups[0]
        return state, len(members)
    finally:
        await admin.close()
