"""Records the router does not control, on a real broker with the router as a real
process: what producers in other languages send (librdkafka with every codec,
keys and headers), record batches no client can decode, and a query too large to
keep whole in its dead letter.

Every record must end as a routing decision or as a dead letter with its reason
and source position, and the router goes on: it never exits, so it never
crash-loops on a record it cannot read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest

from schemas import DeadLetter, QueryEvent
from tests.faults import decisions, start_worker
from tests.record_batches import ZSTD, record_batch
from workers.config import ROUTER_APP_ID, Settings
from workers.services import LocalBroker
from workers.stream.kafka_io import read_topic
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

SETTINGS = Settings(kafka_partitions=2)
NAMES = SETTINGS.topic_names()
ROUTES = [NAMES[f"route:{m}"] for m in SETTINGS.router_models]
DEFAULT_PRODUCER_MAX_REQUEST_SIZE = 1_000_000  # Faust's producer_max_request_size


@pytest.fixture
def broker() -> Iterator[str]:
    """A broker of its own, with the product's topics: every topic starts empty."""
    with LocalBroker() as local:
        asyncio.run(create_topics(SETTINGS, local.bootstrap_servers))
        yield local.bootstrap_servers


def router_environment(bootstrap: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "KAFKA_PARTITIONS": "2",
        "ROUTER_WINDOW_SECONDS": "0.5",
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "METRICS_PORT": "0",
    }


@contextlib.contextmanager
def running_router(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    router = start_worker("router", env, log)
    try:
        yield router
    finally:
        router.terminate()
        try:
            router.wait(timeout=30)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait()


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def wait_until_routed(
    bootstrap: str, expected: set[str], router: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll the route topics until every expected query has a decision; the router
    must stay alive all along."""
    deadline = time.monotonic() + 90
    while not expected <= set(decisions(bootstrap, ROUTES)):
        assert router.poll() is None, f"the router exited ({router.returncode}):\n{log_tail(log)}"
        if time.monotonic() > deadline:
            missing = sorted(expected - set(decisions(bootstrap, ROUTES)))
            raise AssertionError(
                f"{len(missing)} of {len(expected)} queries never routed, e.g. {missing[:5]}\n"
                f"{log_tail(log)}"
            )
        time.sleep(0.5)


def dead_letters(bootstrap: str) -> list[DeadLetter]:
    return [
        DeadLetter.model_validate_json(raw)
        for raw in asyncio.run(read_topic(bootstrap, NAMES["deadletter"]))
    ]


def wait_for_dead_letters(bootstrap: str, count: int, log: Path) -> list[DeadLetter]:
    deadline = time.monotonic() + 30
    while len(letters := dead_letters(bootstrap)) < count:
        assert time.monotonic() < deadline, (
            f"{len(letters)} of {count} dead letters\n{log_tail(log)}"
        )
        time.sleep(0.5)
    return letters


def query(query_id: str) -> QueryEvent:
    return QueryEvent(query_id=query_id, text=f"What is the capital of country number {query_id}?")


def encoded(queries: list[QueryEvent]) -> list[bytes]:
    return [q.model_dump_json().encode() for q in queries]


# --- librdkafka producers ------------------------------------------------------------


def produce_with_librdkafka(bootstrap: str, queries: list[QueryEvent], codec: str) -> None:
    """Produce as a librdkafka application does: compressed batches, keyed by query id,
    with headers; returns once the broker acknowledged every record."""
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": codec,
            "linger.ms": 50,  # several records per compressed batch
            "acks": "all",
        }
    )
    failures: list[object] = []
    for number, event in enumerate(queries):
        producer.produce(
            NAMES["queries"],
            key=event.query_id.encode(),
            value=event.model_dump_json().encode(),
            headers=[
                ("trace-id", f"trace-{number}".encode()),
                ("content-type", b"application/json"),
            ],
            on_delivery=lambda error, _message: failures.append(error) if error else None,
        )
    assert producer.flush(30) == 0, "records left unsent"
    assert not failures, failures


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_queries_from_a_librdkafka_producer_are_routed_with_every_codec(
    codec: str, broker: str, postgres_url: str, tmp_path: Path
) -> None:
    queries = [query(f"{codec}-{i}") for i in range(40)]
    produce_with_librdkafka(broker, queries, codec)
    log = tmp_path / "router.log"
    with running_router(router_environment(broker, postgres_url), log) as router:
        wait_until_routed(broker, {q.query_id for q in queries}, router, log)
        routed = decisions(broker, ROUTES)
    print(f"{codec}: produced {len(queries)}, routed {len(routed)}")
    assert set(routed) == {q.query_id for q in queries}
    assert all(len(set(d)) == 1 for d in routed.values())  # one decision each
    assert dead_letters(broker) == []


# --- record batches no client can decode -----------------------------------------------

# The v2 record batch header (Kafka's protocol): the CRC-32C at byte 17 covers
# everything from the attributes (byte 21, the low 3 bits name the codec) onward.


async def produce_raw_batch(bootstrap: str, partition: int, batch: bytes) -> int:
    """Send one record batch as it is, in a produce request of its own (a client
    would refuse to build it); return the offset the broker gave its first record."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(TopicPartition(NAMES["queries"], partition))
        request = ProduceRequest(
            transactional_id=None,
            required_acks=-1,
            timeout=10_000,
            topics=[(NAMES["queries"], [(partition, batch)])],
        )
        response = await client.send(leader, request)
        ((_, ((_, error_code, offset, *_),)),) = response.topics
        assert error_code == 0, f"the broker refused the batch: error {error_code}"
        return int(offset)
    finally:
        await client.close()


async def produce_to_partition(bootstrap: str, partition: int, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(NAMES["queries"], value, partition=partition)
    finally:
        await producer.stop()


async def committed(bootstrap: str, partition: int) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=ROUTER_APP_ID)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(NAMES["queries"], partition))
    finally:
        await consumer.stop()


def test_undecodable_record_batches_are_dead_letters_and_routing_goes_on(
    broker: str, postgres_url: str, tmp_path: Path
) -> None:
    """A batch whose CRC is wrong (partition 0) and one that claims zstd but is not
    zstd (partition 1), each between valid queries of its partition."""
    lost = encoded([query(f"unreadable-{i}") for i in range(6)])
    corrupt = {
        0: record_batch(lost[:3], crc_flip=0xFFFF),
        1: record_batch(lost[3:], claimed_codec=ZSTD),
    }
    valid: list[QueryEvent] = []
    spans: dict[int, tuple[int, int]] = {}
    for partition, batch in corrupt.items():
        before = [query(f"before-{partition}-{i}") for i in range(5)]
        after = [query(f"after-{partition}-{i}") for i in range(5)]
        asyncio.run(produce_to_partition(broker, partition, encoded(before)))
        first = asyncio.run(produce_raw_batch(broker, partition, batch))
        spans[partition] = (first, first + 2)
        asyncio.run(produce_to_partition(broker, partition, encoded(after)))
        valid += before + after

    log = tmp_path / "router.log"
    with running_router(router_environment(broker, postgres_url), log) as router:
        wait_until_routed(broker, {q.query_id for q in valid}, router, log)
        letters = wait_for_dead_letters(broker, len(corrupt), log)
        deadline = time.monotonic() + 30
        while not all(
            (asyncio.run(committed(broker, p)) or 0) > last for p, (_, last) in spans.items()
        ):
            assert time.monotonic() < deadline, "the group's offsets stayed before a bad batch"
            time.sleep(0.5)
        assert router.poll() is None

    print("dead letters:", [(d.source_partition, d.source_offset, d.reason) for d in letters])
    assert len(letters) == len(corrupt)  # one per batch, each once
    by_partition = {letter.source_partition: letter for letter in letters}
    for partition, (first, last) in spans.items():
        letter = by_partition[partition]
        assert letter.source_topic == NAMES["queries"]
        assert (letter.source_offset, letter.source_last_offset) == (first, last)
        assert letter.reason.startswith("undecodable record batch"), letter.reason
    assert "CRC" in by_partition[0].reason
    assert set(decisions(broker, ROUTES)) == {q.query_id for q in valid}


# --- a dead letter larger than the producer may send ------------------------------------


def test_an_oversize_query_is_a_bounded_dead_letter_and_its_batch_is_routed(
    broker: str, postgres_url: str, tmp_path: Path
) -> None:
    """A ~900 KB query among valid ones on one partition (one predict batch): its dead
    letter, base64 and envelope included, would exceed the producer's request size."""
    valid = [query(f"small-{i}") for i in range(12)]
    huge = QueryEvent(query_id="huge", text="lorem ipsum " * 75_000)  # 900,000 characters
    huge_raw = huge.model_dump_json().encode()
    values = encoded(valid)
    asyncio.run(produce_to_partition(broker, 0, [*values[:6], huge_raw, *values[6:]]))

    log = tmp_path / "router.log"
    with running_router(router_environment(broker, postgres_url), log) as router:
        wait_until_routed(broker, {q.query_id for q in valid}, router, log)
        (letter,) = wait_for_dead_letters(broker, 1, log)

    print(
        f"oversize: {len(huge_raw)} bytes; dead letter {len(letter.model_dump_json())} bytes, "
        f"excerpt {len(base64.b64decode(letter.raw_base64))} bytes; reason {letter.reason!r}"
    )
    assert "ROUTER_MAX_TEXT_CHARS" in letter.reason
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        NAMES["queries"],
        0,
        6,
    )
    assert letter.truncated and letter.original_size_bytes == len(huge_raw)
    excerpt = base64.b64decode(letter.raw_base64)
    assert 0 < len(excerpt) < len(huge_raw) and huge_raw.startswith(excerpt)
    assert len(letter.model_dump_json()) < DEFAULT_PRODUCER_MAX_REQUEST_SIZE
    assert set(decisions(broker, ROUTES)) == {q.query_id for q in valid}
