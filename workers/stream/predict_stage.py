"""The router's first stage: omnirouter.queries -> validate -> predict -> omnirouter.predicted.

Per-query work that scales out over partitions and router processes. Invalid
queries become dead letters with their reason; valid ones are predicted in
micro-batches and forwarded keyed by pool, so a pool's window gathers on one
partition of omnirouter.predicted: one record (PredictedBatch) per pool of a
micro-batch, split in halves while it would not fit a produce request. A batch
is acknowledged only once all its records are acknowledged by the broker
(`held_batches`, `release`). Two batches are in flight at once: one predicted on
the predictor thread while the event loop reads the next and sends the one
before, records sent in the order the batches were read.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, TypeVar

from faust.types import EventT, StreamT

from schemas import PredictedBatch, QueryEvent
from workers.config import PoolPolicy, Settings
from workers.db.repository import unstorable_fields
from workers.routing.windows import bounded_created_at, broker_time
from workers.stream import metrics
from workers.stream.app import (
    PRODUCER_MAX_REQUEST_BYTES,
    Topics,
    decode_or_dead_letter,
    held_batches,
    release,
    value_room_bytes,
)
from workers.stream.codec import BadEvent, decode, encode, refuse_too_deep, refuse_unwritable
from workers.stream.publishers import ESCALATION_KEY_PREFIX
from workers.stream.router_state import RouterState

T = TypeVar("T")

# Whatever arrived within this long is predicted together (up to ROUTER_PREDICT_BATCH).
PREDICT_BATCH_SECONDS = 0.05


def prediction_room_bytes(models: Sequence[str]) -> int:
    """What a prediction adds to its query's JSON: the model names and three numbers
    per model, with room to spare for fields the query left to their defaults."""
    per_model = max((len(m.encode()) for m in models), default=0) + 3 * 32 + 8
    return len(models) * per_model + 4096


# What an assignment adds to its query's text and metadata: ids, model, window and
# numbers (under 1 KB with names at their 200-character limit), with room to spare.
ASSIGNMENT_ROOM_BYTES = 2048
# The router forwards a query as pydantic writes it, which can be longer than the
# bytes it came in: a number such as 1e15 is written 1000000000000000.0 (4.5 times
# its 4 bytes), and fields left out get their defaults. Strings and whitespace
# never grow. Below this growth a query's raw size settles the check, without
# encoding it again.
MAX_REENCODED_GROWTH = 5
DEFAULTS_ROOM_BYTES = 1024


class RecordLoad(NamedTuple):
    """What the largest record forwarded for a query holds: copies of its text and
    metadata, and of its predictions."""

    queries: int
    predictions: int


def largest_record(
    policy: PoolPolicy, pool_models: int, transactions: bool, shadows: bool
) -> RecordLoad:
    """The largest record forwarded for a query of a pool. One-shot: its prediction
    (the query and its predictions), or without transactions a decision entry of
    an answer and its shadow (`shadows`: ROUTER_SHADOW_SHARE > 0). Cascade: a
    probe holds the query twice and its predictions (its context carries the
    predicted query), and without transactions a decision entry holds a probe per
    panel model (a configured panel's size; a chosen panel's two at most)."""
    if policy.cascade:
        panel = len(policy.cascade_panel) if policy.cascade_panel else min(2, pool_models - 1)
        probes = 1 if transactions else max(panel, 1)
        return RecordLoad(2 * probes, probes)
    answers = 2 if not transactions and shadows and pool_models > 1 else 1
    return RecordLoad(answers, 1)


@dataclass(frozen=True)
class QueryRules:
    """What a query must satisfy to be forwarded, read from the settings once per
    stage rather than once per query (pool policies are models built on each call)."""

    max_text_chars: int
    pool_models: Mapping[str, frozenset[str]]  # known pool -> the models it may use
    prediction_room: int  # bytes a prediction adds to its query
    largest: Mapping[str, RecordLoad]  # known pool -> `largest_record`

    @classmethod
    def of(cls, settings: Settings, transactions: bool) -> QueryRules:
        """`transactions`: whether the router publishes with them
        (broker_features.use_transactions)."""
        policies = {pool: settings.pool_policy(pool) for pool in settings.known_pools()}
        pool_models = {
            pool: frozenset(policy.models or settings.router_models)
            for pool, policy in policies.items()
        }
        shadows = settings.router_shadow_share > 0
        return cls(
            max_text_chars=settings.router_max_text_chars,
            pool_models=pool_models,
            prediction_room=prediction_room_bytes(settings.router_models),
            largest={
                pool: largest_record(policy, len(pool_models[pool]), transactions, shadows)
                for pool, policy in policies.items()
            },
        )

    def validate(self, raw: bytes | None) -> QueryEvent:
        """A valid QueryEvent the router can forward, or BadEvent with the reason."""
        query = decode(raw, QueryEvent)
        assert raw is not None  # decode refuses an empty message
        unstorable = unstorable_fields(
            {"query_id": query.query_id, "text": query.text, "pool": query.pool}
        )
        if unstorable is not None:
            # Routed and answered, its outcome would be refused: no learning from it.
            raise BadEvent(f"query whose outcome the database cannot store: {unstorable}")
        # A lone surrogate in metadata or hints: the prediction could not be written,
        # and the predict stage failed on it at every restart.
        refuse_unwritable(raw, query)
        # Metadata nested deeper than a record forwarding it can be written.
        refuse_too_deep(raw, {"metadata": query.metadata})
        if query.query_id.startswith(ESCALATION_KEY_PREFIX):
            # Its decision would share a key with another query's escalation decision,
            # and one of the two queries would get no final answer.
            raise BadEvent(
                f"query_id begins with {ESCALATION_KEY_PREFIX!r}, which the router reserves "
                "for its escalation decisions"
            )
        if len(query.text) > self.max_text_chars:
            raise BadEvent(
                f"text has {len(query.text)} characters, more than "
                f"ROUTER_MAX_TEXT_CHARS={self.max_text_chars}"
            )
        pool_models = self.pool_models.get(query.pool)
        if pool_models is None:
            raise BadEvent(f"unknown pool {query.pool!r}; known: {sorted(self.pool_models)}")
        allowed = query.hints.allowed_models if query.hints else None
        if allowed is not None and not pool_models & set(allowed):
            raise BadEvent(f"hints.allowed_models names none of pool {query.pool!r}'s models")
        size = self.forwarded_size(raw, query)
        if not self.fits(query.pool, size):
            copies = self.largest[query.pool].queries
            held = "" if copies == 1 else f" {copies} times in one of pool {query.pool!r}'s records"
            raise BadEvent(
                f"query of {size} bytes as the router writes it: forwarded{held}, it would "
                f"exceed the router's producer request size ({PRODUCER_MAX_REQUEST_BYTES} bytes)"
            )
        return query

    def fits(self, pool: str, size: int) -> bool:
        """Does a query of `size` bytes fit the largest record forwarded for it?"""
        load = self.largest[pool]
        held = (
            load.queries * (size + ASSIGNMENT_ROOM_BYTES) + load.predictions * self.prediction_room
        )
        return held <= PRODUCER_MAX_REQUEST_BYTES

    def forwarded_size(self, raw: bytes, query: QueryEvent) -> int:
        """The query's bytes as the router forwards it: encoded again where its raw
        size cannot settle the check (a query of 1e15s once passed at 300 KB, its
        prediction 1.14 MB: the predict stage failed on it at every restart)."""
        if self.fits(query.pool, MAX_REENCODED_GROWTH * len(raw) + DEFAULTS_ROOM_BYTES):
            return len(raw)
        return len(encode(query))


def validate_query(raw: bytes | None, settings: Settings, transactions: bool = True) -> QueryEvent:
    """A valid QueryEvent the router can forward, or BadEvent with the reason (as a
    router publishing with `transactions` checks it)."""
    return QueryRules.of(settings, transactions).validate(raw)


def with_bounded_time(
    event: EventT, query: QueryEvent, skew: timedelta, now: datetime | None = None
) -> QueryEvent:
    """The query with its `created_at` held within `skew` of its record's broker
    timestamp (and of the router's clock): it decides the window's hourly budget."""
    now = now or datetime.now(UTC)
    stamped = broker_time(event.message.timestamp, now)
    bounded = bounded_created_at(query.created_at, stamped, now, skew)
    return (
        query if bounded == query.created_at else query.model_copy(update={"created_at": bounded})
    )


async def valid_queries(
    events: Sequence[EventT], topics: Topics, rules: QueryRules, skew: timedelta
) -> list[QueryEvent]:
    """The events' valid queries, their times bounded and counted per pool; the
    others are dead letters."""
    decoded = await decode_or_dead_letter(events, rules.validate, topics.deadletter)
    now = datetime.now(UTC)
    valid = [with_bounded_time(event, query, skew, now) for event, query in decoded]
    for pool, count in Counter(query.pool for query in valid).items():
        metrics.QUERIES_IN.labels(pool).inc(count)
    return valid


async def send_predictions(topics: Topics, batch: PredictedBatch) -> None:
    """Send a micro-batch's records, then wait for the broker's acknowledgements together."""
    records = pool_records(batch, PRODUCER_MAX_REQUEST_BYTES)
    sent = [await topics.predicted.send(key=key, value=value) for key, value in records]
    await asyncio.gather(*sent)


# Micro-batches read and not yet acknowledged by the broker: one predicted while
# the next is read and the one before sent. The predictor is one thread, so a
# third would only wait behind the second (measured: no faster).
BATCHES_IN_FLIGHT = 2


@dataclass(frozen=True)
class InFlight:
    """A micro-batch between the steps of `pipelined`: its events, held until the
    broker has its predictions, and its prediction under way (None: nothing valid)."""

    events: Sequence[EventT]
    prediction: asyncio.Task[PredictedBatch] | None


async def pipelined(
    held: AsyncIterable[Sequence[EventT]],
    read_valid: Callable[[Sequence[EventT]], Awaitable[list[QueryEvent]]],
    predict: Callable[[list[QueryEvent]], Coroutine[Any, Any, PredictedBatch]],
    send: Callable[[PredictedBatch], Awaitable[None]],
) -> None:
    """Read the valid queries of each micro-batch of `held` (`held_batches`), predict
    and send them, BATCHES_IN_FLIGHT at a time: while the predictor thread predicts
    one, the event loop reads the next and sends the one before (one after another,
    each step left the others idle). Batches are sent in the order read, each
    released once the broker acknowledged its records; a failure in any step
    fails the whole, its batches unreleased."""
    in_flight: asyncio.Queue[InFlight | None] = asyncio.Queue()
    slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
    async with asyncio.TaskGroup() as group:
        group.create_task(send_in_order(in_flight, send, slots))
        async for events in held:
            await slots.acquire()
            valid = await read_valid(events)
            prediction = group.create_task(predict(valid)) if valid else None
            in_flight.put_nowait(InFlight(events, prediction))
        in_flight.put_nowait(None)


async def send_in_order(
    in_flight: asyncio.Queue[InFlight | None],
    send: Callable[[PredictedBatch], Awaitable[None]],
    slots: asyncio.Semaphore,
) -> None:
    """Send each batch's predictions in turn, release its events, free its slot."""
    while (batch := await in_flight.get()) is not None:
        if batch.prediction is not None:
            await send(await finished(batch.prediction))
        release(batch.events)
        slots.release()


async def finished(prediction: asyncio.Task[PredictedBatch]) -> PredictedBatch:
    """The prediction's result. One cancelled on its own (its executor shut down)
    is a failure: awaited bare, its CancelledError would end the sender quietly,
    which a TaskGroup does not count as one, and the stage would wait forever."""
    await asyncio.wait({prediction})
    if prediction.cancelled():
        raise RuntimeError("a prediction was cancelled before it finished")
    return prediction.result()


def pool_records(batch: PredictedBatch, max_request_bytes: int) -> list[tuple[bytes, bytes]]:
    """(key, value) records: each pool's predictions of the batch, keyed by the pool,
    in as few records as fit a produce request, in the batch's order."""
    rows: dict[str, list[int]] = defaultdict(list)
    for row, query in enumerate(batch.queries):
        rows[query.pool].append(row)
    records: list[tuple[bytes, bytes]] = []
    for pool, pool_rows in rows.items():
        key = pool.encode()
        room = value_room_bytes(key, max_request_bytes)
        records += [(key, value) for value in fitting(batch, pool_rows, room)]
    return records


def fitting(batch: PredictedBatch, rows: list[int], room: int) -> list[bytes]:
    """The rows encoded as one record, or halved until each part fits `room` bytes
    (a lone query fits: validation refused those that would not)."""
    value = encode(batch if len(rows) == len(batch.queries) else rows_of(batch, rows))
    if len(value) <= room or len(rows) == 1:
        return [value]
    half = len(rows) // 2
    return [*fitting(batch, rows[:half], room), *fitting(batch, rows[half:], room)]


def rows_of(batch: PredictedBatch, rows: list[int]) -> PredictedBatch:
    """The batch's rows `rows` (validated with the batch, so not again). A per-row
    column the batch left empty (no clusters, no cascade pool) stays empty."""

    def pick(column: Sequence[T]) -> list[T]:
        return [column[r] for r in rows] if column else []

    return PredictedBatch.model_construct(
        schema_version=batch.schema_version,
        models=batch.models,
        queries=pick(batch.queries),
        quality=pick(batch.quality),
        cost_usd=pick(batch.cost_usd),
        support=pick(batch.support),
        cluster=pick(batch.cluster),
        mean_variance=pick(batch.mean_variance),
        predicted_at=batch.predicted_at,
        cascade_cluster=pick(batch.cascade_cluster),
        cascade_fit=pick(batch.cascade_fit),
    )


async def predict_stage(
    state: RouterState,
    topics: Topics,
    settings: Settings,
    transactions: bool,
    stream: StreamT[bytes],
) -> None:
    """One actor: two would interleave events, so windows would see queries out
    of production order and hourly budgets would go wrong. `transactions`: whether
    the router publishes with them (what its records hold: QueryRules)."""
    rules = QueryRules.of(settings, transactions)
    skew = timedelta(seconds=settings.router_clock_skew_seconds)
    await pipelined(
        held_batches(stream, settings.router_predict_batch, PREDICT_BATCH_SECONDS),
        partial(valid_queries, topics=topics, rules=rules, skew=skew),
        state.predict,
        partial(send_predictions, topics),
    )
