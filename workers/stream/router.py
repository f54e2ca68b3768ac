"""The router worker: validate and predict, then solve each pool's window and publish.

Two agents, so the heavy per-query work scales apart from the window solve:
- `predict` reads omnirouter.queries (any partition, any number of workers),
  dead-letters what is invalid, predicts in micro-batches and forwards to
  omnirouter.predicted keyed by pool;
- `solve_windows` reads omnirouter.predicted, where a pool's queries share a
  partition, gathers a tumbling window (ROUTER_WINDOW_SECONDS, closing early
  at ROUTER_MAX_WINDOW_QUERIES: Faust's `take_events`), solves each pool's
  part and publishes assignments and the window report.

Exactly one decision per query, across restarts: offsets are acknowledged
only after a window is published (at-least-once), and a Faust table keyed by
query_id (changelog-backed, so it survives restarts) records each decision
before its assignment is sent and marks it published afterwards. A replayed
window skips published queries and re-sends recorded decisions unchanged;
consumers de-duplicate by query_id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import faust
import sqlalchemy as sa
from faust.types import EventT, StreamT
from sqlalchemy.orm import Session

from schemas import Assignment, PredictedQuery, QueryEvent
from workers.config import ROUTER_APP_ID, Settings
from workers.db.repository import iter_outcomes
from workers.routing.embedder import Embedder, SentenceEmbedder
from workers.routing.predictor import HybridPredictor, KnnSettings, fit_hybrid
from workers.routing.store import OutcomeRecord, RetrievalStore
from workers.routing.windows import WindowBounds, route_window, traffic_span
from workers.stream import metrics
from workers.stream.app import Topics, batches, decode_or_dead_letter, make_app
from workers.stream.codec import BadEvent, decode, encode

log = logging.getLogger(__name__)
T = TypeVar("T")

PUBLISHED = b"P"  # followed by "<changelog partition>:<unix time>"
DECIDED = b"D"  # followed by the assignment's JSON
# A transaction stamps its rows with its start time and may commit after a read
# that started later; each read goes back this far, and re-reading is harmless.
REFRESH_OVERLAP = timedelta(seconds=5)
REFRESH_CHUNK = 5000


def published_marker(partition: int, at: float) -> bytes:
    return PUBLISHED + f"{partition}:{at:.0f}".encode()


def forgettable(value: bytes, cutoff: float) -> int | None:
    """The changelog partition of a published marker older than `cutoff`, so its
    entry can be deleted; None for anything to keep. Decisions not yet marked
    published are kept: a restart must re-send them."""
    if not value.startswith(PUBLISHED):
        return None
    try:
        partition, at = value[len(PUBLISHED) :].decode().split(":")
        return int(partition) if float(at) < cutoff else None
    except ValueError:
        return None


def validate_query(raw: bytes | None, settings: Settings) -> QueryEvent:
    """A valid QueryEvent, or BadEvent with the reason."""
    query = decode(raw, QueryEvent)
    if len(query.text) > settings.router_max_text_chars:
        raise BadEvent(
            f"text has {len(query.text)} characters, more than "
            f"ROUTER_MAX_TEXT_CHARS={settings.router_max_text_chars}"
        )
    if query.pool not in settings.known_pools():
        raise BadEvent(f"unknown pool {query.pool!r}; known: {sorted(settings.known_pools())}")
    pool_models = set(settings.pool_policy(query.pool).models or settings.router_models)
    allowed = query.hints.allowed_models if query.hints else None
    if allowed is not None and not pool_models & set(allowed):
        raise BadEvent(f"hints.allowed_models names none of pool {query.pool!r}'s models")
    return query


class RouterState:
    """The predictor and its upkeep. Every predictor call runs on one thread, so
    the event loop keeps heartbeating while it embeds, and store updates never
    race a search."""

    def __init__(self, settings: Settings, embedder: Embedder, database_url: str) -> None:
        self.settings = settings
        self.engine = sa.create_engine(database_url, pool_pre_ping=True) if database_url else None
        store = RetrievalStore(settings.router_models, embedder.dimension)
        self.predictor = HybridPredictor(
            embedder,
            store,
            prices=settings.router_model_prices,
            knn=KnnSettings(
                neighbours=settings.router_knn_neighbours,
                prior_strength=settings.router_prior_strength,
            ),
            model_priors=settings.router_model_priors,
        )
        self.watermark: datetime | None = None
        self.predictor_thread = ThreadPoolExecutor(1, thread_name_prefix="predictor")
        self.background = ThreadPoolExecutor(1, thread_name_prefix="router-io")

    async def on_predictor_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.predictor_thread, function, *args
        )

    def _copy_new_outcomes(self) -> int:
        """Stream outcomes changed since the last refresh from the database into the
        store, a chunk at a time (the store is changed on the predictor thread)."""
        if self.engine is None:
            return 0
        store = self.predictor.store
        since = None if self.watermark is None else self.watermark - REFRESH_OVERLAP
        copied = 0

        def apply(chunk: list[tuple[OutcomeRecord, datetime]]) -> None:
            store.add_stored(record for record, _ in chunk)

        with Session(self.engine) as session:
            # The database's clock when this read's snapshot starts: the next read
            # starts a little before it, to catch transactions that began earlier
            # but committed later, and re-reads nothing older however idle it is.
            read_started = session.execute(
                sa.select(sa.func.now(type_=sa.DateTime(timezone=True)))
            ).scalar_one()
            rows = iter_outcomes(session, updated_since=since)
            while chunk := list(itertools.islice(rows, REFRESH_CHUNK)):
                self.predictor_thread.submit(apply, chunk).result()
                copied += len(chunk)
        self.watermark = read_started
        return copied

    async def refresh_store(self) -> int:
        """Add outcomes stored since the last refresh; a database outage only delays it."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.background, self._copy_new_outcomes)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("store refresh: database unavailable (%s); keeping the current store", exc)
            return 0

    async def refit(self) -> None:
        """Refit heads and blend on a snapshot of the store, off the serving thread."""
        predictor = self.predictor
        vectors, scores, costs = await self.on_predictor_thread(
            predictor.store.snapshot, self.settings.router_refit_max_outcomes
        )
        if len(vectors) < 50:
            return
        loop = asyncio.get_running_loop()
        heads, weight, report = await loop.run_in_executor(
            self.background, fit_hybrid, vectors, scores, costs, predictor.knn
        )

        def swap() -> None:
            predictor.heads, predictor.blend_weight = heads, weight

        await self.on_predictor_thread(swap)
        log.info("refit on %d outcomes, blend weight %.2f", report.outcomes_used, weight)

    async def predict(self, queries: Sequence[QueryEvent]) -> list[PredictedQuery]:
        estimates = await self.on_predictor_thread(
            self.predictor.predict, [q.text for q in queries]
        )
        models = self.settings.router_models
        return [
            PredictedQuery(
                query=query,
                models=models,
                quality=estimates.quality[row].tolist(),
                cost_usd=estimates.cost[row].tolist(),
                support=estimates.support[row].tolist(),
            )
            for row, query in enumerate(queries)
        ]


def build_router_app(
    settings: Settings, bootstrap_servers: str, database_url: str, embedder: Embedder | None = None
) -> faust.App:
    app = make_app(ROUTER_APP_ID, settings, bootstrap_servers)
    topics = Topics.of(app, settings)
    routed = app.Table(
        "routed",
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.kafka_partitions,
        help="query_id -> decided assignment, then published marker",
    )
    state = RouterState(settings, embedder or SentenceEmbedder(), database_url)
    # The store is rebuilt before the worker starts: no query is predicted from
    # an empty store just because the database was slow to answer.
    count = asyncio.run(state.refresh_store())
    asyncio.run(state.refit())
    log.info("retrieval store rebuilt from the database: %d outcomes", count)

    @app.timer(settings.router_store_refresh_seconds)
    async def refresh() -> None:
        count = await state.refresh_store()
        if count:
            log.info("retrieval store: +%d outcomes, %d queries", count, len(state.predictor.store))

    @app.timer(min(settings.router_dedup_horizon_seconds / 4, 300.0))
    async def forget_old_decisions() -> None:
        """Query ids published longer ago than ROUTER_DEDUP_HORIZON_SECONDS leave the
        table (and its changelog), so its memory stays bounded."""
        cutoff = time.time() - settings.router_dedup_horizon_seconds
        forgotten = 0
        for key, value in list(routed.data.items()):
            partition = forgettable(value, cutoff)
            if partition is not None:
                del routed.data[key]
                routed.send_changelog(partition, key, None)
                forgotten += 1
        if forgotten:
            log.info("forgot %d query ids published before the de-duplication horizon", forgotten)

    @app.timer(settings.router_refit_seconds)
    async def refit() -> None:
        await state.refit()

    # One actor. Two (Faust's concurrency=2) kept the predictor thread busy 6% more,
    # but their buffers take every other event, so predictions reached the
    # window stage out of production order and hourly budgets went wrong: in
    # `make demo` a window of 117 queries was given $0.0018 (traffic_span).
    @app.agent(topics.queries)
    async def predict(stream: StreamT[bytes]) -> None:
        async for events in batches(stream, settings.router_predict_batch, 0.05):
            decoded = await decode_or_dead_letter(
                events, lambda raw: validate_query(raw, settings), topics.deadletter
            )
            valid = [query for _, query in decoded]
            if not valid:
                continue
            for query in valid:
                metrics.QUERIES_IN.labels(query.pool).inc()
            sent = [
                await topics.predicted.send(key=p.query.pool.encode(), value=encode(p))
                for p in await state.predict(valid)
            ]
            await asyncio.gather(*sent)

    window_length = timedelta(seconds=settings.router_window_seconds)
    last_query_created: dict[str, datetime] = {}  # pool -> its latest window's last query
    # pool -> exploration allowance its latest window left (in memory: a restart
    # starts it again from nothing, which only ever explores less).
    exploration_carried: dict[str, float] = {}

    @app.agent(topics.predicted)
    async def solve_windows(stream: StreamT[bytes]) -> None:
        async for events in batches(
            stream, settings.router_max_window_queries, settings.router_window_seconds
        ):
            closed = datetime.now(UTC)
            by_pool: dict[str, list[tuple[EventT, PredictedQuery]]] = defaultdict(list)
            for event in events:
                predicted = PredictedQuery.model_validate_json(event.message.value or b"")
                by_pool[predicted.query.pool].append((event, predicted))
            for pool, items in by_pool.items():
                # Budgets per hour follow the time the queries were produced in.
                start, end = traffic_span(
                    [p.query.created_at for _, p in items],
                    last_query_created.get(pool),
                    window_length,
                )
                last_query_created[pool] = max(end, last_query_created.get(pool, end))
                window_id = f"{pool}:{closed.isoformat()}:{uuid.uuid4().hex[:8]}"
                await publish_window(pool, items, WindowBounds(window_id, start, end))

    async def publish_window(
        pool: str, items: list[tuple[EventT, PredictedQuery]], bounds: WindowBounds
    ) -> None:
        fresh: list[tuple[EventT, PredictedQuery]] = []
        resend: list[Assignment] = []
        seen: set[str] = set()
        for event, predicted in items:
            query_id = predicted.query.query_id
            recorded = routed.get(query_id.encode())
            if query_id in seen or (recorded is not None and recorded.startswith(PUBLISHED)):
                log.info("duplicate query_id %s skipped", query_id)
            elif recorded is not None:
                resend.append(Assignment.model_validate_json(recorded[len(DECIDED) :]))
            else:
                fresh.append((event, predicted))
            seen.add(query_id)
        partition_of = {p.query.query_id: e.message.partition for e, p in items}
        assignments: list[Assignment] = []
        if fresh:
            assignments, report = route_window(
                pool,
                settings.pool_policy(pool),
                [p for _, p in fresh],
                settings.router_models,
                bounds,
                capacities=settings.router_model_capacities,
                fallback_model=settings.router_fallback_model,
                solver=settings.router_solver,
                time_limit_seconds=settings.router_solver_time_limit_seconds,
                tie_tolerance=settings.router_tie_tolerance,
                exploration_share=settings.router_exploration_share,
                exploration_carried_usd=exploration_carried.get(pool, 0.0),
            )
            exploration_carried[pool] = report.exploration_carried_usd
            for assignment in assignments:
                remember(
                    assignment.query_id,
                    partition_of[assignment.query_id],
                    DECIDED + encode(assignment),
                )
            await app.producer.flush()  # decisions are durable before anything is sent
        outgoing = [*assignments, *resend]
        sent = [
            await topics.routes[a.model].send(key=a.query_id.encode(), value=encode(a))
            for a in outgoing
        ]
        await asyncio.gather(*sent)
        published_at = time.time()
        for assignment in outgoing:
            partition = partition_of[assignment.query_id]
            remember(assignment.query_id, partition, published_marker(partition, published_at))
        if fresh:
            await topics.windows.send(key=pool.encode(), value=encode(report))
            metrics.observe_window(report, assignments)
            log.info(
                "window %s: %d queries, status %s, predicted spend $%.6f of %s, solved in %.1f ms",
                bounds.window_id, report.query_count, report.solver_status,
                report.predicted_spend_usd, report.window_budget_usd, report.solve_seconds * 1000,
                extra={
                    "window_id": bounds.window_id,
                    "pool": pool,
                    "query_ids": [a.query_id for a in assignments],
                    "models": [a.model for a in assignments],
                },
            )  # fmt: skip

    def remember(query_id: str, partition: int, value: bytes) -> None:
        """Set the table entry in the partition of the pool it came from, so the
        worker that owns that partition recovers it after a restart."""
        key = query_id.encode()
        routed.data[key] = value
        routed.send_changelog(partition, key, value)

    return app
