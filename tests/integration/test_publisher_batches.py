"""The window publishers' record batches (workers/stream/publishers.py `send`) on a
real broker: a keyed record lands in the partition a plain `producer.send` gives
its key (consumers and a re-sent decision rely on it), a record with a partition
in that one, in the order sent within each partition, over several batches."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from workers.config import Settings
from workers.services import LocalBroker
from workers.stream.kafka_io import read_records
from workers.stream.publishers import Record, send
from workers.stream.router import producer_options

pytestmark = pytest.mark.integration

PARTITIONS = 4


async def create(bootstrap: str, *topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


def by_partition(records: list[tuple[int, bytes]]) -> dict[int, list[bytes]]:
    """Keys in the order of each partition."""
    keys: dict[int, list[bytes]] = defaultdict(list)
    for partition, key in records:
        keys[partition].append(key)
    return dict(keys)


async def send_both_ways(bootstrap: str, keys: list[bytes]) -> None:
    # Small batches: the 300 records take dozens of them.
    options = {**producer_options(Settings(), bootstrap), "max_batch_size": 1024}
    producer = AIOKafkaProducer(**options)
    await producer.start()
    try:
        batched = [Record("batched", b"x" * 40, key, None) for key in keys]
        batched += [Record("given", b"y" * 40, key, i % PARTITIONS) for i, key in enumerate(keys)]
        await asyncio.gather(*await send(producer, batched))
        plain = [await producer.send("plain", b"x" * 40, key=key) for key in keys]
        await asyncio.gather(*plain)
    finally:
        await producer.stop()


def test_batched_records_land_where_plain_sends_do_in_order() -> None:
    keys = [f"query-{i}".encode() for i in range(300)]
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create(bootstrap, "batched", "plain", "given"))
        asyncio.run(send_both_ways(bootstrap, keys))
        read = asyncio.run(read_records(bootstrap, ["batched", "plain", "given"]))
    placed = {
        topic: by_partition([(r.partition, r.key) for r in read if r.topic == topic])
        for topic in ("batched", "plain", "given")
    }
    assert sum(len(k) for k in placed["batched"].values()) == len(keys)
    assert placed["batched"] == placed["plain"]  # same partition, same order, per key
    assert len(placed["batched"]) > 1  # the keys spread over the partitions
    assert placed["given"] == {
        p: [k for i, k in enumerate(keys) if i % PARTITIONS == p] for p in range(PARTITIONS)
    }
