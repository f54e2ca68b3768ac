"""The outcome writer: omnirouter.outcomes -> PostgreSQL (the router reads them back).

Offsets are acknowledged only after the batch is in the database; while the
database is unavailable the writer retries with backoff and reads nothing new,
so no outcome is lost, and the upsert on (query_id, model) makes a replayed
batch harmless (and uncounted: the metrics count an outcome only when its write
changes the stored row, and of it only what the row takes: its spend with its
attempt, its score if it replaces the stored one). An outcome without the
query's text must update a stored outcome of the same (query_id, model) (a late
score, say): one for a query the database has never seen would teach nothing,
and one naming a model that never answered the query would store a phantom
outcome (a score with no answer, cost or tokens, which the router would read as
that model's result), so both go to the dead-letter topic.

Two scores for one (query_id, model) from the same source are ordered by their
own time (`with_score_time`), not by the order they are written: after a
rebalance during a database outage, the partition's old owner keeps retrying its
batch while the new owner writes that batch and later events (a user's second
score); when the database returns, the old owner's retry must not put the first
score back. The upsert keeps the later score (repository._takes_score), which is
right whichever writes land last. Stopping the retry once the consumer's
generation is no longer current would not be: the generation can change while
an attempt is under way, and that attempt still lands after the new owner's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faust
import numpy as np
import sqlalchemy as sa
from faust.types import StreamT
from mode import CrashingSupervisor
from sqlalchemy.orm import Session

from schemas import Outcome
from workers.config import Settings
from workers.db.repository import (
    Change,
    changing_outcomes,
    stored_models,
    unstorable_reason,
    upsert_outcomes,
)
from workers.routing.embedder import Embedder, make_embedder
from workers.routing.windows import bounded_created_at, broker_time
from workers.stream import metrics
from workers.stream.app import (
    Topics,
    batches,
    decode_or_dead_letter,
    make_app,
    send_dead_letter,
)
from workers.stream.codec import BadEvent, decode

log = logging.getLogger(__name__)

OUTCOMES_APP_ID = "omnirouter-outcomes"
MAX_RETRY_SECONDS = 30.0
# A batch written: (query_id, model) -> why refused, and the outcomes that changed
# the table, with what they changed.
Written = tuple[dict[tuple[str, str], str], list[tuple[Outcome, Change]]]


def validate_outcome(raw: bytes | None, settings: Settings) -> Outcome:
    """An outcome the writer can store, or BadEvent with the reason: one the database
    would refuse goes to the dead-letter topic rather than jam its batch."""
    outcome = decode(raw, Outcome)
    if outcome.model not in settings.router_models:
        raise BadEvent(f"outcome for unknown model {outcome.model!r}")
    unstorable = unstorable_reason(outcome)
    if unstorable is not None:
        raise BadEvent(f"outcome the database cannot store: {unstorable}")
    return outcome


def with_score_time(
    outcome: Outcome, broker_timestamp: float, skew: timedelta, now: datetime
) -> Outcome:
    """The outcome with the time that orders its score against another of its source:
    its producer's `created_at` (else its record's broker timestamp), held within
    `skew` of that timestamp and no later than `skew` past this writer's clock `now`
    (a producer's clock a day ahead, on a topic stamped at creation, would pin its
    score against later ones). Not the time this writer decoded it: every writer
    that reads the record again gives it the same time, unless it stood ahead of
    the writer's clock."""
    stamped = broker_time(broker_timestamp, now)
    given = outcome.created_at if "created_at" in outcome.model_fields_set else stamped
    moment = bounded_created_at(given, stamped, now, skew)
    if moment == outcome.created_at:
        return outcome
    return outcome.model_copy(update={"created_at": moment})


def textless_refusals(
    outcomes: Sequence[Outcome], stored: Mapping[str, set[str]]
) -> dict[tuple[str, str], str]:
    """Why each (query_id, model) of a textless outcome cannot be stored, by pair:
    neither `stored` (query_id -> models with a stored outcome) nor an outcome of
    the batch with the text holds that pair. Feedback for a model that never
    answered the query would otherwise insert a phantom row."""
    answered: dict[str, set[str]] = {q: set(models) for q, models in stored.items()}
    for outcome in outcomes:
        if outcome.text:
            answered.setdefault(outcome.query_id, set()).add(outcome.model)
    refusals: dict[tuple[str, str], str] = {}
    for outcome in outcomes:
        models = answered.get(outcome.query_id, set())
        if outcome.text or outcome.model in models:
            continue
        if models:
            reason = (
                f"outcome for query {outcome.query_id!r} without its text names model "
                f"{outcome.model!r}, which never answered it (answered: {sorted(models)})"
            )
        else:
            reason = f"outcome for unknown query {outcome.query_id!r} without its text"
        refusals[outcome.query_id, outcome.model] = reason
    return refusals


def build_outcome_app(
    settings: Settings, bootstrap_servers: str, database_url: str, embedder: Embedder | None = None
) -> faust.App:
    if not database_url:
        raise ValueError("DATABASE_URL is not set")
    app = make_app(OUTCOMES_APP_ID, settings, bootstrap_servers)
    topics = Topics.of(app, settings)
    skew = timedelta(seconds=settings.router_clock_skew_seconds)
    engine = sa.create_engine(database_url, pool_pre_ping=True)
    text_embedder = embedder or make_embedder(
        settings.router_embedder, Path(settings.embedder_cache_dir)
    )

    def write(outcomes: Sequence[Outcome]) -> Written:
        """Store the outcomes; return the (query_id, model) pairs refused, with the
        reason (`textless_refusals`), and the outcomes stored that changed their row,
        with what they changed (`changing_outcomes`). The embedding runs outside the
        write's transaction, which stays short."""
        textless = {o.query_id for o in outcomes if not o.text}
        with Session(engine) as session:
            stored = stored_models(session, textless)
        refused = textless_refusals(outcomes, stored)
        kept = [o for o in outcomes if (o.query_id, o.model) not in refused]
        texts = [o.text for o in kept if o.text]
        vectors = iter(text_embedder.embed(texts)) if texts else iter(())
        embeddings: list[np.ndarray | None] = [next(vectors) if o.text else None for o in kept]
        with Session(engine) as session, session.begin():
            changed = changing_outcomes(session, kept)
            upsert_outcomes(session, kept, embeddings, text_embedder.name)
        return refused, changed

    @app.agent(topics.outcomes, supervisor_strategy=CrashingSupervisor)
    async def store_outcomes(stream: StreamT[bytes]) -> None:
        async for events in batches(stream, 500, 0.5):
            valid = await decode_or_dead_letter(
                events, lambda raw: validate_outcome(raw, settings), topics.deadletter
            )
            if not valid:
                continue
            now = datetime.now(UTC)
            outcomes = [
                with_score_time(outcome, event.message.timestamp, skew, now)
                for event, outcome in valid
            ]
            refused, changed = await write_with_retry(outcomes)
            written = [o for o in outcomes if (o.query_id, o.model) not in refused]
            metrics.observe_outcomes(
                written=len(changed),
                attempts=[o for o, change in changed if change.attempt],
                scores=[o for o, change in changed if change.score],
            )
            log.debug(
                "wrote %d outcomes",
                len(written),
                extra={"query_ids": sorted({o.query_id for o in written})},
            )
            for event, outcome in valid:
                reason = refused.get((outcome.query_id, outcome.model))
                if reason is not None:
                    await send_dead_letter(event, reason, topics.deadletter)

    async def write_with_retry(outcomes: list[Outcome]) -> Written:
        delay, attempt = 0.5, 1
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        while True:
            try:
                written = await loop.run_in_executor(None, write, outcomes)
                metrics.OUTCOME_WRITE_SECONDS.observe(time.monotonic() - started)
                if attempt > 1:
                    log.info("wrote %d outcomes after %d attempts", len(outcomes), attempt)
                return written
            except sa.exc.OperationalError as exc:
                log.warning(
                    "database unavailable (attempt %d, retry in %.1fs): %s",
                    attempt,
                    delay,
                    exc.orig,
                )
                metrics.OUTCOME_WRITE_RETRIES.inc()
                await asyncio.sleep(delay)
                delay, attempt = min(delay * 2, MAX_RETRY_SECONDS), attempt + 1

    return app
