"""Replaying RouterBench-format files: queries into Kafka, or past outcomes into the database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from sqlalchemy.orm import Session

from schemas import Outcome, QueryEvent
from workers.db.repository import upsert_outcomes
from workers.routing.dataset import OutcomeTable
from workers.routing.embedder import Embedder
from workers.stream.codec import encode


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
    await producer.start()
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


def seed_outcomes(
    engine: sa.Engine, table: OutcomeTable, embedder: Embedder, run_id: str = "seed"
) -> int:
    """Store every model's recorded outcome on every prompt: a warm start for the router."""
    vectors = embedder.embed(table.prompts)
    outcomes, embeddings = [], []
    for row, prompt in enumerate(table.prompts):
        for column, model in enumerate(table.models):
            score, cost = table.scores[row, column], table.costs[row, column]
            outcomes.append(
                Outcome(
                    query_id=f"{run_id}-{table.sample_ids[row]}",
                    model=model,
                    quality_score=None if score != score else float(score),
                    cost_usd=None if cost != cost else float(cost),
                    text=prompt,
                )
            )
            embeddings.append(vectors[row])
    with Session(engine) as session, session.begin():
        upsert_outcomes(session, outcomes, embeddings)
    return len(outcomes)
