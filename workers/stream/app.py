"""The Faust app of one worker role, and its topics.

Every role is its own app (its own consumer group): the router, the outcome
writer and the model workers scale out independently, each by adding
processes and partitions. Topics carry raw bytes: the event contracts in
schemas/ (pydantic) are the one source of truth for their content, and the
agents decode them themselves so a bad message becomes a dead letter, not a
crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import faust
from faust.types import EventT, StreamT, TopicT

from schemas import DeadLetter
from workers.config import Settings
from workers.logs import logging_config
from workers.stream import metrics, table_store
from workers.stream.codec import BadEvent, dead_letter, dead_letter_key, encode
from workers.stream.security import faust_credentials
from workers.stream.transport import FETCH_MAX_WAIT_ATTRIBUTE

log = logging.getLogger(__name__)
T = TypeVar("T")

# The most one produce request of a worker may carry (Faust's default, stated so
# the router can refuse a query it could not forward; README "Record sizes").
PRODUCER_MAX_REQUEST_BYTES = 1_000_000
# What a produce request adds to a record's key and value: the record batch's
# header (61 bytes) and the record's own framing (aiokafka's estimate), and more.
RECORD_FRAMING_BYTES = 256
# A router sends a few messages per query to a dozen topics; waiting 5 ms
# gathers them into a few produce requests instead of one per message
# (socket writes were 40% of a busy router's event loop without it).
PRODUCER_LINGER_MS = 5
# What a worker holds ahead of its agents. Faust's defaults (4,096 events per
# stream buffered, every fetched record handed over at once) held a 20,000-query
# burst's backlog as thousands of messages in a router's memory; its agents take
# at most a few hundred events at a time, so a few batches ahead keep them busy.
STREAM_BUFFER_EVENTS = 1024
RECORDS_PER_POLL = 1024


def value_room_bytes(key: bytes, max_request_bytes: int = PRODUCER_MAX_REQUEST_BYTES) -> int:
    """The most bytes a record's value may have under `key` and still fit in one
    produce request."""
    return max_request_bytes - len(key) - RECORD_FRAMING_BYTES


def make_app(app_id: str, settings: Settings, bootstrap_servers: str) -> faust.App:
    if not bootstrap_servers:
        raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set")
    # Tables live in memory (rebuilt from their changelogs), so Faust's data
    # directory holds nothing worth keeping: a private temporary one per process.
    # Their store keeps only the changelog partitions the worker owns (table_store.py).
    datadir = Path(tempfile.gettempdir()) / "omnirouter-faust" / f"{app_id}-{os.getpid()}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        # omnikafka: Faust's aiokafka transport with KAFKA_FETCH_MAX_WAIT_MS (transport.py).
        broker=[f"omnikafka://{server}" for server in bootstrap_servers.split(",")],
        store=f"{table_store.SCHEME}://",
        # No standby replicas: a memory store re-reads a partition it takes over from
        # its changelog's beginning anyway, so reading other workers' changelogs all
        # along would be work for nothing (and the store keeps none of it).
        table_standby_replicas=0,
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        # `omnirouter topics create` makes every topic with its partition count.
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=PRODUCER_LINGER_MS,
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        stream_buffer_maxsize=STREAM_BUFFER_EVENTS,
        broker_max_poll_records=RECORDS_PER_POLL,
        broker_rebalance_timeout=settings.rebalance_timeout_seconds(),
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_heartbeat_interval=min(1.0, settings.kafka_session_timeout_seconds / 4),
        broker_credentials=faust_credentials(settings),
        web_enabled=False,
        datadir=str(datadir),
    )
    setattr(app, FETCH_MAX_WAIT_ATTRIBUTE, settings.kafka_fetch_max_wait_ms)
    metrics.track_consumer_lag(app)
    return app


@dataclass(frozen=True)
class Topics:
    """The product's topics as seen by one app."""

    queries: TopicT
    predicted: TopicT
    windows: TopicT
    outcomes: TopicT
    responses: TopicT
    deadletter: TopicT
    routes: dict[str, TopicT]  # model -> omnirouter.route.<model>
    probed: TopicT | None = None  # cascade pools' probed queries (the router's)

    @classmethod
    def of(cls, app: faust.App, settings: Settings) -> Topics:
        names = settings.topic_names()

        def raw(name: str) -> TopicT:
            return app.topic(
                name,
                key_serializer="raw",
                value_serializer="raw",
                partitions=settings.kafka_partitions,
            )

        return cls(
            queries=raw(names["queries"]),
            predicted=raw(names["predicted"]),
            windows=raw(names["windows"]),
            outcomes=raw(names["outcomes"]),
            responses=raw(names["responses"]),
            deadletter=raw(names["deadletter"]),
            routes={m: raw(names[f"route:{m}"]) for m in settings.router_models},
            probed=raw(names["probed"]),
        )


async def held_batches(
    stream: StreamT[bytes], max_events: int, within_seconds: float
) -> AsyncIterator[Sequence[EventT]]:
    """Faust's `take_events`: lists of up to `max_events` events, or whatever arrived
    within `within_seconds`, each event holding one reference more, which only
    `release` gives back: an event is acknowledged once its holder is done with it.

    `take_events` acknowledges a list in a `finally`, so also when the body that
    got it raised: its offsets would be committed although nothing was done with
    them. The reference of our own keeps them unacknowledged until released."""
    async for events in cast(faust.Stream[bytes], stream).take_events(max_events, within_seconds):
        for event in events:
            event.message.incref()
        yield events


def release(events: Sequence[EventT]) -> None:
    """Give back the reference `held_batches` took: the events are done with."""
    for event in events:
        event.ack()


async def batches(
    stream: StreamT[bytes], max_events: int, within_seconds: float
) -> AsyncIterator[Sequence[EventT]]:
    """`held_batches` whose events are released when the loop body that got them has
    finished (not when it raised)."""
    async for events in held_batches(stream, max_events, within_seconds):
        yield events
        release(events)


def hand_over(events: Sequence[EventT]) -> None:
    """Let events go unprocessed because a rebalance began: this worker is done with
    them (its revocation waits for no more of them), but their offsets are never
    acknowledged, so the partition's owner re-reads them from the committed offset."""
    for event in events:
        event.message.acked = True


async def decode_or_dead_letter(
    events: Sequence[EventT], validate: Callable[[bytes | None], T], deadletter: TopicT
) -> list[tuple[EventT, T]]:
    """The events that validate, each with its value; each other one goes to the
    dead-letter topic with its reason and source position, and the batch goes on.
    The letters are acknowledged by the broker, together, when this returns."""
    valid: list[tuple[EventT, T]] = []
    rejected: list[tuple[EventT, str]] = []
    for event in events:
        try:
            valid.append((event, validate(event.message.value)))
        except BadEvent as exc:
            rejected.append((event, str(exc)))
    await asyncio.gather(*(send_dead_letter(e, reason, deadletter) for e, reason in rejected))
    return valid


async def send_dead_letter(
    event: EventT, reason: str, deadletter: TopicT, value: bytes | None = None
) -> None:
    """Send the event's dead letter and wait for the broker's acknowledgement: the
    caller acknowledges the event after this, and a letter still in the producer's
    buffer when the event's offset is committed would be lost with a crash.

    `value`: as for `letter_for`."""
    key, letter = letter_for(event, reason, deadletter, value)
    sent = await deadletter.send(key=key, value=encode(letter))
    await sent
    metrics.observe_dead_letters([letter])


def letter_for(
    event: EventT, reason: str, deadletter: TopicT, value: bytes | None = None
) -> tuple[bytes | None, DeadLetter]:
    """The event's dead letter and its key, logged (sent, and counted once sent, by
    the caller: `send_dead_letter`, or a window's publisher when the letter is a
    query's recorded outcome, workers/stream/window_stage.py).

    The letter is sized to fit the app's producer request: a larger event is kept
    as an excerpt (the producer would refuse the whole, and the agent's batch would
    fail with it). `value`: the part of the event's value the letter is about (one
    query of a batch record), instead of all of it."""
    message = event.message
    log.warning(
        "dead letter from %s[%d]@%d: %s", message.topic, message.partition, message.offset, reason
    )
    limit = deadletter.app.conf.producer_max_request_size
    raw = message.value if value is None else value
    letter = dead_letter(raw, message.topic, message.partition, message.offset, reason, limit)
    return dead_letter_key(message.key, limit), letter


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Every allocation of this size or more is its own mapping, returned to the system
# when freed. glibc's default starts at 128 KB and rises to the largest block freed
# (up to 32 MB), after which numpy's and FAISS's temporary arrays were carved from
# the heap and left it fragmented.
MMAP_THRESHOLD_BYTES = 256 * 1024
# Heaps shared by the process's threads. glibc gives each thread that allocates its
# own (up to 8 per core): memory one thread freed (the predictor's, the consumer
# thread's) stayed resident in its heap, unused by the others.
HEAP_ARENAS = 2


def bound_heap() -> None:
    """Keep freed memory from staying resident in glibc's heaps (a router's peak RSS
    came from them, not from live objects); called before the process builds
    anything large or starts threads. Elsewhere than glibc a no-op."""
    # OSError / TypeError: no C library to open by name; AttributeError: not glibc.
    with contextlib.suppress(OSError, TypeError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, HEAP_ARENAS)


def run_worker(
    app: faust.App, settings: Settings, default_metrics_port: int, loglevel: str
) -> None:
    """Serve the metrics, then run the app until SIGTERM or SIGINT and stop it
    cleanly (Faust's Worker)."""
    port = default_metrics_port if settings.metrics_port is None else settings.metrics_port
    metrics.serve(port, settings.metrics_host)
    worker = faust.Worker(
        app,
        loglevel=loglevel,
        quiet=True,
        logging_config=logging_config(loglevel, settings.log_format),
    )
    # No terminal spinner: at --loglevel warning and above Faust shows one and sets
    # the root logger to DEBUG for it, so every debug line of aiokafka and Faust
    # was formatted and thrown away (about 3% of a busy router's time).
    worker.spinner = None
    # What start-up built (imports, a router's retrieval store) lives as long as the
    # process: frozen, the collector's full passes no longer walk it (a busy router
    # spent ~0.14 s of its event loop on each of them).
    gc.collect()
    gc.freeze()
    worker.execute_from_commandline()
