"""A router that lost a partition cannot publish for it (workers/stream/fencing.py),
on the persistent broker, which has transactions.

Two routers' producers for the same partition of omnirouter.predicted: the one
that owned it is writing a window when the other is assigned the partition. The
old owner's window must fail as Fenced and never be readable; the new owner's is.
"""

from __future__ import annotations

import asyncio

import pytest
from faust.types import TP

from tests.integration.test_broker_features import create_topic, read_committed
from workers.services import PersistentLocalBroker
from workers.stream.fencing import Fenced, PartitionProducers

pytestmark = pytest.mark.integration

INPUT, OUTPUT = "omnirouter.predicted", "omnirouter.route.test"


def producers(bootstrap: str) -> PartitionProducers:
    return PartitionProducers("fencing-test", INPUT, {"bootstrap_servers": bootstrap})


async def old_owner_fenced_mid_window(bootstrap: str) -> None:
    old, new = producers(bootstrap), producers(bootstrap)
    partition = {TP(INPUT, 0)}
    await old.on_assigned(partition)
    try:
        with pytest.raises(Fenced):
            async with old.transaction(0) as producer:
                await producer.send_and_wait(OUTPUT, b"old owner's assignment")
                await new.on_assigned(partition)  # a rebalance gave the partition away
        assert old.owned == set()  # no second try with a fenced producer
        with pytest.raises(Fenced):
            async with old.transaction(0):
                pass
        async with new.transaction(0) as producer:
            await producer.send_and_wait(OUTPUT, b"new owner's assignment")
    finally:
        await asyncio.gather(old.stop(), new.stop())


def test_the_old_owner_of_a_partition_cannot_publish_once_it_was_reassigned(
    persistent_broker: PersistentLocalBroker,
) -> None:
    bootstrap = persistent_broker.bootstrap_servers
    asyncio.run(create_topic(bootstrap, OUTPUT))
    asyncio.run(old_owner_fenced_mid_window(bootstrap))
    assert asyncio.run(read_committed(bootstrap, OUTPUT)) == [b"new owner's assignment"]


async def revoked_partition_is_released(bootstrap: str) -> None:
    owner = producers(bootstrap)
    try:
        await owner.on_assigned({TP(INPUT, 0), TP(INPUT, 1), TP("another.topic", 2)})
        assert owner.owned == {0, 1}  # partitions of its input topic only
        await owner.on_assigned({TP(INPUT, 1)})
        assert owner.owned == {1}
        with pytest.raises(Fenced):
            async with owner.transaction(0):
                pass
    finally:
        await owner.stop()


def test_a_revoked_partition_has_no_producer(persistent_broker: PersistentLocalBroker) -> None:
    asyncio.run(revoked_partition_is_released(persistent_broker.bootstrap_servers))


async def two_windows_at_once_on_one_partition(bootstrap: str) -> None:
    """Two windows of pools sharing a partition (a cascade pool's escalations and
    another pool's window, published by two agents) each get the partition's
    producer in turn: aiokafka allows one open transaction per producer, and a
    second begun beside the first failed, stopping the worker."""
    owner = producers(bootstrap)
    await owner.on_assigned({TP(INPUT, 0)})
    first_open = asyncio.Event()

    async def window(value: bytes, hold: bool) -> None:
        async with owner.transaction(0) as producer:
            first_open.set()
            await producer.send_and_wait(OUTPUT, value)
            if hold:  # the other window asks for the producer while this one is open
                await asyncio.sleep(0.2)

    async def second() -> None:
        await first_open.wait()
        await window(b"second window", hold=False)

    try:
        await asyncio.wait_for(
            asyncio.gather(window(b"first window", hold=True), second()), timeout=30
        )
    finally:
        await owner.stop()


def test_two_windows_on_one_partition_are_published_one_transaction_after_the_other(
    persistent_broker: PersistentLocalBroker,
) -> None:
    bootstrap = persistent_broker.bootstrap_servers
    asyncio.run(create_topic(bootstrap, OUTPUT))
    asyncio.run(two_windows_at_once_on_one_partition(bootstrap))
    committed = asyncio.run(read_committed(bootstrap, OUTPUT))
    assert b"first window" in committed and b"second window" in committed
