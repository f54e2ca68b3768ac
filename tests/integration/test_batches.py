"""The batch mechanism every agent uses, on a real broker: an agent body that
raises must not get its batch acknowledged. Faust's `take_events` acknowledges a
batch in a `finally`; before `batches` held a reference of its own, a failing
batch's offsets were committed and its records were never processed by anyone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.apps.failing_agent import DONE, GROUP, SOURCE
from workers.services import LocalBroker
from workers.stream.kafka_io import produce_values, read_topic

pytestmark = pytest.mark.integration


async def create(bootstrap: str, *topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=1, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


async def committed(bootstrap: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(SOURCE, 0))
    finally:
        await consumer.stop()


def test_a_batch_whose_body_raised_is_not_acknowledged(tmp_path: Path) -> None:
    values = [f"ok-{i}" for i in range(5)] + ["boom"] + [f"ok-{i}" for i in range(6, 30)]
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create(bootstrap, SOURCE, DONE))
        asyncio.run(produce_values(bootstrap, SOURCE, [(v, v) for v in values]))
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.run(
                [sys.executable, "-m", "tests.apps.failing_agent"],
                env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap},
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        position = asyncio.run(committed(bootstrap))
        echoed = asyncio.run(read_topic(bootstrap, DONE))
    text = log.read_text(errors="replace")
    print(f"exit {worker.returncode}, committed offset {position}, echoed {len(echoed)}")
    assert worker.returncode != 0, text[-2000:]  # the worker stops: nothing silently skipped
    assert "an agent body failed" in text
    boom = values.index("boom")
    # The committed offset stays at or before the failed record: a restarted worker
    # reads it (and whatever came after it) again.
    assert position is None or position <= boom, (position, text[-2000:])
    assert b"boom" not in echoed
