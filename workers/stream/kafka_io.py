"""Plain aiokafka producing and reading, for commands and tests outside the Faust app."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def produce_values(
    bootstrap_servers: str, topic: str, keyed_values: Sequence[tuple[str, str | bytes]]
) -> None:
    """Send (key, value) pairs and wait until the broker acknowledged every one."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
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
    bootstrap_servers: str, topic: str, expected: int, timeout_seconds: float = 30.0
) -> list[bytes]:
    """Read a topic from the beginning until `expected` values arrived or time ran out."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"omnirouter-reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
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
