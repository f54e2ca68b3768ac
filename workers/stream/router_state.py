"""The router's predictor and its upkeep: store refresh from PostgreSQL, refits,
and predictions, all on one predictor thread so the event loop keeps
heartbeating while it embeds, and store updates never race a search.

Construction does no I/O; `warm` rebuilds the store before the worker starts
(the `omnirouter router` command calls it), so no query is predicted from an
empty store just because the database was slow to answer.

The store holds vectors of the router's embedder only. `warm` first re-embeds,
in the database, the stored texts whose vectors another embedder made (after
ROUTER_EMBEDDER changed), and says so in the log; outcomes that arrive later
with such a vector (an outcome writer not yet switched) are re-embedded in
memory as they are copied.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

import faiss
import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas import PredictedBatch, QueryEvent
from workers.config import Settings
from workers.db.repository import (
    iter_outcomes,
    replace_vectors,
    scored_answers,
    texts_of_other_embedders,
)
from workers.routing.cascade import NoPanel
from workers.routing.cascade_fit import MAX_FIT_QUERIES, fit_pool_cascade
from workers.routing.cascade_window import FittedCascade, pool_clusters
from workers.routing.embedder import Embedder
from workers.routing.predictor import (
    Estimates,
    HybridPredictor,
    KnnSettings,
    refit_on,
)
from workers.routing.spend import SpendTracker
from workers.routing.store import OutcomeRecord, RetrievalStore, reembedded

log = logging.getLogger(__name__)
T = TypeVar("T")

# A transaction stamps its rows with its start time and may commit after a read
# that started later; each read goes back this far, and re-reading is harmless.
REFRESH_OVERLAP = timedelta(seconds=5)
REFRESH_CHUNK = 5000
# Stored texts re-embedded per transaction when the embedder changed.
REEMBED_CHUNK = 1000
# FAISS searches on the predictor thread alone. Its OpenMP team (a thread per core)
# spun while it waited, which on a busy 2-core machine tripled the CPU a prediction
# took (786 -> 246 us per query, batches of 50, 100,000 stored) and its wall time
# too; a router's parallelism is its partitions and processes. OpenMP's thread count
# is each thread's own setting: the event loop's thread (which assigns cascade
# clusters) sets it when it builds RouterState, every worker thread as it starts.
FAISS_THREADS = 1


def router_predictor(settings: Settings, embedder: Embedder) -> HybridPredictor:
    """The router's predictor, over an empty store, as its settings describe it."""
    store = RetrievalStore(settings.router_models, embedder.dimension, embedder=embedder.name)
    return HybridPredictor(
        embedder,
        store,
        prices=settings.router_model_prices,
        knn=KnnSettings(
            neighbours=settings.router_knn_neighbours,
            prior_strength=settings.router_prior_strength,
        ),
        model_priors=settings.router_model_priors,
    )


def predicted_batch(
    models: Sequence[str],
    queries: Sequence[QueryEvent],
    estimates: Estimates,
    cascade_clusters: Sequence[int | None] = (),
    cascade_fits: Sequence[str | None] = (),
) -> PredictedBatch:
    """The queries' predictions as the event the window stage reads, one row each."""
    # Each matrix to Python floats in one call, not three calls per query.
    uncertainty = estimates.uncertainty
    return PredictedBatch(
        models=list(models),
        queries=list(queries),
        quality=estimates.quality.tolist(),
        cost_usd=estimates.cost.tolist(),
        support=estimates.support.tolist(),
        cluster=[] if uncertainty is None else uncertainty.cluster.tolist(),
        mean_variance=[] if uncertainty is None else uncertainty.variance.tolist(),
        cascade_cluster=list(cascade_clusters),
        cascade_fit=list(cascade_fits),
    )


def worker_thread(name: str) -> ThreadPoolExecutor:
    """One thread for the router's background work, FAISS on FAISS_THREADS in it."""
    return ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=faiss.omp_set_num_threads, initargs=(FAISS_THREADS,)
    )


class RouterState:
    """The predictor and its upkeep. Every predictor call runs on one thread, so
    the event loop keeps heartbeating while it embeds, and store updates never
    race a search."""

    def __init__(self, settings: Settings, embedder: Embedder, database_url: str) -> None:
        self.settings = settings
        faiss.omp_set_num_threads(FAISS_THREADS)
        self.engine = sa.create_engine(database_url, pool_pre_ping=True) if database_url else None
        self.predictor = router_predictor(settings, embedder)
        self.watermark: datetime | None = None
        # Published assignments' predicted cost against their outcomes' (the
        # publishers expect, the store refresh observes); None: correction off.
        self.spend = SpendTracker() if settings.router_spend_correction else None
        # Cascade pools' fitted policies; None: too few stored answers yet (one-shot).
        self.cascades: dict[str, FittedCascade | None] = dict.fromkeys(
            [p for p, policy in settings.router_pools.items() if policy.cascade]
        )
        self.predictor_thread = worker_thread("predictor")
        self.background = worker_thread("router-io")
        # Cascade fits take seconds to minutes: never in the way of store refreshes.
        self.cascade_thread = worker_thread("cascade-fit")
        self._refitting = asyncio.Lock()

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

        embedder = self.predictor.embedder

        def apply(chunk: list[tuple[OutcomeRecord, datetime]]) -> None:
            records, count = reembedded([record for record, _ in chunk], embedder, store.knows)
            if count:
                log.info(
                    "re-embedded %d stored texts of another embedder with %s", count, embedder.name
                )
            store.add_stored(records)

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
                if self.spend is not None:  # a row read twice (the overlap) counts once
                    for record, _ in chunk:
                        self.spend.observe(record.query_id, record.model, record.cost_usd)
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
        """Refit heads and blend on a snapshot of the store, off the serving thread
        (one refit at a time: the timer's and the store's growth may coincide)."""
        if self._refitting.locked():
            return
        async with self._refitting:
            predictor = self.predictor
            snapshot = await self.on_predictor_thread(
                predictor.store.snapshot, self.settings.router_refit_max_outcomes
            )
            loop = asyncio.get_running_loop()
            fitted = await loop.run_in_executor(self.background, refit_on, snapshot, predictor.knn)
            if fitted is None:
                return
            await self.on_predictor_thread(predictor.use, fitted)
        log.info(
            "refit on %d outcomes, blend weight %.2f",
            fitted.report.outcomes_used,
            fitted.blend_weight,
        )

    async def refit_if_grown(self) -> bool:
        """Refit now if the store grew by ROUTER_REFIT_GROWTH since the last fit
        (`refit_due`); the router checks after each store refresh."""
        settings = self.settings
        due = await self.on_predictor_thread(
            self.predictor.grown_since_fit,
            settings.router_refit_growth,
            settings.router_refit_max_outcomes,
        )
        if not due:
            return False
        await self.refit()
        return True

    def _fit_cascade(self, pool: str) -> FittedCascade | None:
        """Fit the pool's cascade from the stored answers (None: too few yet)."""
        if self.engine is None:
            return None
        settings, policy = self.settings, self.settings.pool_policy(pool)
        models = policy.models or settings.router_models
        with Session(self.engine) as session:
            rows = scored_answers(session, models, MAX_FIT_QUERIES * len(models))
        fitted, usable = fit_pool_cascade(
            rows, models, policy.cascade_panel, self.predictor.embedder,
            self.predictor.knn, settings.cascade_min_outcomes,
            capped=list(settings.router_model_capacities),
        )  # fmt: skip
        if fitted is None:
            log.warning(
                "pool %s routes one-shot: %d stored queries with the panel's answers and scores, "
                "its cascade needs %d (CASCADE_MIN_OUTCOMES)",
                pool, usable, settings.cascade_min_outcomes,
            )  # fmt: skip
        else:
            log.info("pool %s: cascade fitted on %d stored queries, panel %s",
                     pool, usable, fitted.panel)  # fmt: skip
        return fitted

    async def refit_cascades(self) -> None:
        """Refit every cascade pool's policy off the serving thread; a database outage,
        or a fit that fails on what is stored, keeps the current one (none: the pool
        routes one-shot) rather than stopping the router at start or on its timer."""
        loop = asyncio.get_running_loop()
        for pool in list(self.cascades):
            try:
                fitted = await loop.run_in_executor(self.cascade_thread, self._fit_cascade, pool)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("pool %s: cascade refit: database unavailable (%s)", pool, exc)
                continue
            except NoPanel as exc:
                log.warning(
                    "pool %s: no cascade fitted (%s); it keeps its current policy, "
                    "one-shot if none",
                    pool, exc,
                )  # fmt: skip
                continue
            except Exception:
                log.exception("pool %s: cascade refit failed; keeping its current policy", pool)
                continue
            if fitted is not None or self.cascades[pool] is None:
                self.cascades[pool] = fitted

    async def embed(self, texts: Sequence[str]) -> Any:
        """Query vectors (a cascade's clusters), on the predictor thread."""
        return await self.on_predictor_thread(self.predictor.embedder.embed, list(texts))

    def _reembed_stored(self) -> int:
        """Give every stored query whose vector another embedder made (ROUTER_EMBEDDER
        changed) a vector of this router's embedder, made from its stored text."""
        if self.engine is None:
            return 0
        embedder = self.predictor.embedder
        total = 0
        while True:
            with Session(self.engine) as session, session.begin():
                pending = texts_of_other_embedders(session, embedder.name, REEMBED_CHUNK)
                if not pending:
                    break
                vectors = embedder.embed([text for _, text in pending])
                replace_vectors(
                    session, [query_id for query_id, _ in pending], vectors, embedder.name
                )
            total += len(pending)
            log.warning(
                "embedder is now %s: re-embedded %d stored queries from their texts so far "
                "(their vectors were of another embedder)", embedder.name, total,
            )  # fmt: skip
        return total

    async def warm(self) -> int:
        """Re-embed what another embedder stored, rebuild the store from the database
        and fit the heads, before serving."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.background, self._reembed_stored)
        except sa.exc.SQLAlchemyError as exc:  # refreshes re-embed in memory meanwhile
            log.warning("re-embedding stored queries: database unavailable (%s)", exc)
        count = await self.refresh_store()
        await self.refit()
        await self.refit_cascades()
        log.info("retrieval store rebuilt from the database: %d outcomes", count)
        return count

    def _predict_and_cluster(
        self, queries: Sequence[QueryEvent]
    ) -> tuple[Estimates, list[int | None], list[str | None]]:
        """Predictions, and each cascade pool query's cluster under the pool's fitted
        cascade from the same vectors (the first stage need not embed it again)."""
        estimates = self.predictor.predict([q.text for q in queries])
        pools = [q.pool for q in queries]
        clusters, fits = pool_clusters(self.cascades, pools, estimates.vectors)
        return estimates, clusters, fits

    async def predict(self, queries: Sequence[QueryEvent]) -> PredictedBatch:
        """Every query's predictions, one row each, in the order of ROUTER_MODELS."""
        estimates, clusters, fits = await self.on_predictor_thread(
            self._predict_and_cluster, queries
        )
        return predicted_batch(self.settings.router_models, queries, estimates, clusters, fits)
