"""Fault injection for integration tests: a TCP proxy on loopback the test can cut,
worker processes, and counting what the router published.

Put it between the workers and a service (the broker, PostgreSQL); `cut()` drops
every open connection and refuses new ones, as an unreachable host would look
to a client; `restore()` accepts connections again on the same port. It works
with any broker or database, since it only forwards bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer

from schemas import Assignment, AssignmentRole, QueryEvent
from workers.config import Settings
from workers.routing.dataset import OutcomeTable, load_routerbench, shipped_sample_path
from workers.routing.embedder import Embedder
from workers.services import free_port
from workers.stream.kafka_io import read_records, topic_partitions
from workers.stream.replay import produce_queries, seed_outcomes
from workers.stream.topics import create_topics
from workers.stream.transport import readable_ends

CHUNK = 65536


class TcpProxy:
    def __init__(self, target_port: int, listen_port: int | None = None) -> None:
        self.target_port = target_port
        self.port = listen_port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client.close()
            return
        self._open |= {client, upstream}
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream), self._pipe(upstream_reader, client)
            )
        finally:
            self._open -= {client, upstream}

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def _drop_everything(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()  # a reset, not a polite close
        self._open.clear()

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        self._call(self._drop_everything())

    def restore(self) -> None:
        self._call(self._listen())

    def stop(self) -> None:
        self._call(self._drop_everything())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @contextlib.contextmanager
    def running(self) -> Iterator[TcpProxy]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def start_worker(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """An `omnirouter <command>` worker process ("router", "judge openai", ...), its
    output appended to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", *command.split(), "--loglevel", "info"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def decisions(
    bootstrap: str, topics: list[str], role: AssignmentRole = "answer"
) -> dict[str, list[tuple[str, str]]]:
    """query_id -> every (model, window_id) published for it on the route topics, of
    assignments of `role` (the query's answer by default; "shadow": its shadow answers)."""
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in asyncio.run(read_records(bootstrap, topics)):
        assignment = Assignment.model_validate_json(record.value or b"")
        if assignment.role == role:
            seen[assignment.query_id].append((assignment.model, assignment.window_id))
    return seen


def wait_until(condition: Callable[[], bool], timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_seconds}s: {what}"
        time.sleep(0.5)


def poll_until(condition: Callable[[], bool], timeout_seconds: float) -> bool:
    """Whether `condition` came true before the deadline (wait_until, for a test that
    reports its counts rather than stopping at the timeout)."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


async def lag(bootstrap: str, group: str, topics: list[str]) -> dict[str, int]:
    """'topic[partition]' -> records the group has not committed yet (its end minus its
    committed offset, everything when it has committed nothing). A partition's end is
    one past the last record a read-committed consumer is handed (transport.py
    `readable_ends`): one written in transactions ends with a commit marker, which no
    consumer is handed nor commits past. The Tansu broker answers end offsets short of
    the end (the start of the last batch + 1): there a committed offset past that
    counts as nothing left."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    await probe.start()
    try:
        partitions = await topic_partitions(consumer, topics)
        ends = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) or 0 for tp in partitions}
        behind = {tp: ends[tp] for tp in partitions if ends[tp] > committed[tp]}
        ends.update(await readable_ends(probe, behind))
        return {
            f"{tp.topic}[{tp.partition}]": max(0, ends[tp] - committed[tp]) for tp in partitions
        }
    finally:
        await probe.stop()
        await consumer.stop()


def caught_up(bootstrap: str, group: str, topics: list[str]) -> bool:
    """The group has committed every record of `topics`: nothing it reads is left to
    come (a condition to wait for instead of a fixed sleep)."""
    return not any(asyncio.run(lag(bootstrap, group, topics)).values())


@dataclass(frozen=True)
class DecisionCount:
    """The fault tests' counts over every message published for the produced queries."""

    produced: set[str]
    published: dict[str, list[tuple[str, str]]]  # query_id -> (model, window_id) sent

    @classmethod
    def of(cls, published: dict[str, list[tuple[str, str]]], produced: set[str]) -> DecisionCount:
        return cls(produced, {q: sent for q, sent in published.items() if q in produced})

    @property
    def lost(self) -> set[str]:
        return self.produced - set(self.published)

    @property
    def decided_twice(self) -> dict[str, set[tuple[str, str]]]:
        return {q: set(sent) for q, sent in self.published.items() if len(set(sent)) > 1}

    def __str__(self) -> str:
        messages = sum(len(sent) for sent in self.published.values())
        resent = sum(len(sent) - len(set(sent)) for sent in self.published.values())
        return (
            f"produced {len(self.produced)}, assigned {len(self.published)}, messages "
            f"{messages}, identical re-sends {resent}, lost {len(self.lost)}, "
            f"decided twice {len(self.decided_twice)}"
        )


def produce_in_background(
    bootstrap: str, topic: str, queries: list[QueryEvent], rate_per_second: float
) -> threading.Thread:
    """Produce the queries at a steady rate from a thread, so a test can act mid-stream."""
    thread = threading.Thread(
        target=lambda: asyncio.run(produce_queries(bootstrap, topic, queries, rate_per_second)),
        daemon=True,
    )
    thread.start()
    return thread


SEEDED_PROMPTS = 40


def seeded_router_services(
    bootstrap: str, database_url: str, settings: Settings, embedder: Embedder
) -> OutcomeTable:
    """The topics created and the routers' store seeded with the recorded outcomes of
    the shipped sample's first SEEDED_PROMPTS prompts; returns the sample, whose
    later prompts make the test's queries."""
    asyncio.run(create_topics(settings, bootstrap))
    sample = load_routerbench(shipped_sample_path())
    seed_outcomes(
        sa.create_engine(database_url), sample.take(list(range(SEEDED_PROMPTS))), embedder
    )
    return sample
