"""Replaying outcome files: a RouterBench file's queries into Kafka, or recorded
outcomes (RouterBench or generic warm-start files) into the database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from sqlalchemy.orm import Session

from schemas import Outcome, QueryEvent, ScoreSource
from workers.config import OUTCOME_RESPONSE_CHARS
from workers.db.repository import upsert_outcomes
from workers.routing.dataset import OutcomeTable, RecordedOutcome, table_records
from workers.routing.embedder import Embedder
from workers.stream.codec import encode
from workers.stream.model_worker import response_excerpt


def query_events(table: OutcomeTable, run_id: str, pool: str = "default") -> list[QueryEvent]:
    return [
        QueryEvent(
            query_id=f"{run_id}-{row}",
            text=prompt,
            pool=pool,
            metadata={"sample_id": table.sample_ids[row], "eval_name": table.eval_names[row]},
        )
        for row, prompt in enumerate(table.prompts)
    ]


async def produce_queries(
    bootstrap_servers: str,
    topic: str,
    queries: list[QueryEvent],
    rate_per_second: float,
    progress: Callable[[int], None] = lambda _: None,
    security: Mapping[str, Any] | None = None,
) -> float:
    """Produce at a steady rate (0: as fast as possible), keyed by query_id; return
    the seconds it took. Returns once the broker acknowledged every query. Each
    query's created_at is the moment it is sent, as for live traffic (hourly
    budgets follow it).
    `security`: workers.stream.security.aiokafka_options, for a secured cluster."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5, **(security or {})
    )
    try:
        await producer.start()
    except BaseException:
        await producer.stop()  # a broker out of reach: no "Unclosed AIOKafkaProducer"
        raise
    started = time.monotonic()
    try:
        pending = []
        for number, query in enumerate(queries, start=1):
            if rate_per_second > 0:
                due = started + number / rate_per_second
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
            sent = query.model_copy(update={"created_at": datetime.now(UTC)})  # as live
            pending.append(
                await producer.send(topic, key=sent.query_id.encode(), value=encode(sent))
            )
            if number % 100 == 0:
                progress(number)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


SEED_SOURCE: ScoreSource = "replay"


def seed_records(
    engine: sa.Engine,
    records: Sequence[RecordedOutcome],
    embedder: Embedder,
    run_id: str = "seed",
    response_chars: int = OUTCOME_RESPONSE_CHARS,
) -> int:
    """Store recorded outcomes (one per prompt and model) as a warm start for the
    router: each distinct text is embedded once, every row of a prompt gets its
    vector, and the query id is "<run_id>-<prompt_id>". Returns the rows stored.

    The scores are recorded evaluations, so their source is "replay", as the
    replay model worker's: a user's feedback (user > replay) replaces them, a
    judge's (judge < replay) does not, and seeding a corrected file again
    (replay >= replay) does. "user" would block no later feedback either (user
    >= user), but would count warm-start data as users' feedback, which it is not."""
    texts = list(dict.fromkeys(r.text for r in records))
    vectors = dict(zip(texts, embedder.embed(texts), strict=True)) if texts else {}
    outcomes = [
        Outcome(
            query_id=f"{run_id}-{r.prompt_id}",
            model=r.model,
            quality_score=r.score,
            cost_usd=r.cost,
            output_tokens=r.output_tokens,
            text=r.text,
            source=SEED_SOURCE,
            response=response_excerpt(r.response, response_chars),
        )
        for r in records
    ]
    with Session(engine) as session, session.begin():
        upsert_outcomes(session, outcomes, [vectors[r.text] for r in records], embedder.name)
    return len(outcomes)


def seed_outcomes(
    engine: sa.Engine,
    table: OutcomeTable,
    embedder: Embedder,
    run_id: str = "seed",
    response_chars: int = OUTCOME_RESPONSE_CHARS,
) -> int:
    """Store every model's recorded outcome on every prompt of a RouterBench table."""
    return seed_records(engine, table_records(table), embedder, run_id, response_chars)
