"""A dead letter is on the broker before the event it replaces is acknowledged
(workers/stream/app.py `send_dead_letter`, `decode_or_dead_letter`), on a real
broker: the letters used to be left in the producer's buffer, so a batch's
offsets could be committed while its letters were still unsent, and a crash
then lost them.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import EventT

from tests.integration.test_broker_features import create_topic
from workers.config import Settings
from workers.services import LocalBroker
from workers.stream.app import decode_or_dead_letter, make_app, send_dead_letter
from workers.stream.codec import BadEvent
from workers.stream.kafka_io import read_topic

pytestmark = pytest.mark.integration

DEADLETTER = "test.deadletters"


def event_of(value: bytes, offset: int) -> EventT:
    """What the dead-letter functions read of a Faust event: its message."""
    message = SimpleNamespace(
        topic="test.source", partition=0, offset=offset, key=b"k", value=value
    )
    return cast(EventT, SimpleNamespace(message=message))


def refuse(raw: bytes | None) -> Any:
    raise BadEvent(f"refused {raw!r}")


async def ends_after_each_call(bootstrap: str) -> tuple[int, int]:
    """The dead-letter partition's end offset as the broker reports it right after
    each call returns (one letter, then a batch of three)."""
    await create_topic(bootstrap, DEADLETTER)
    app = make_app("test-dead-letter-acks", Settings(metrics_port=0), bootstrap)
    topic = app.topic(DEADLETTER, key_serializer="raw", value_serializer="raw")
    producer = await app.maybe_start_producer()
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await reader.start()
    partition = TopicPartition(DEADLETTER, 0)

    async def held() -> int:
        return int((await reader.end_offsets([partition]))[partition])

    try:
        await send_dead_letter(event_of(b"bad", 0), "a reason", topic)
        after_one = await held()
        events = [event_of(f"bad {i}".encode(), i + 1) for i in range(3)]
        assert await decode_or_dead_letter(events, refuse, topic) == []
        return after_one, await held()
    finally:
        await reader.stop()
        await producer.stop()


def test_dead_letters_are_on_the_broker_when_the_calls_return() -> None:
    with LocalBroker() as broker:
        after_one, after_batch = asyncio.run(ends_after_each_call(broker.bootstrap_servers))
        letters = asyncio.run(read_topic(broker.bootstrap_servers, DEADLETTER))
    # Unacknowledged, both would still read 0. The local broker reports a record
    # batch's end as one past its first record, so three letters sent together
    # move the end by one or more.
    assert after_one == 1
    assert after_batch > after_one
    assert len(letters) == 4
