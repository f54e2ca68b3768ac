"""The router's predictor upkeep, without Kafka or a database."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import cast

import faiss
import numpy as np
from numpy.typing import NDArray

from schemas import QueryEvent
from workers.config import PoolPolicy, Settings
from workers.routing.cascade import CascadePolicy
from workers.routing.cascade_window import FittedCascade
from workers.routing.predictor import MIN_REFIT_QUERIES, REFIT_LEAST_NEW_OUTCOMES, refit_due
from workers.routing.store import RetrievalStore
from workers.stream.router_state import RouterState


class OneAxis:
    name = "one-axis"
    dimension = 2

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        return np.tile(np.array([1.0, 0.0], np.float32), (len(texts), 1))


def test_faiss_searches_on_the_predictor_thread_alone() -> None:
    """FAISS's OpenMP team spun on a busy machine: three times the CPU per query. The
    count is per thread: it must hold on every thread that searches (the caller's
    assigns cascade clusters)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        state = RouterState(Settings(router_models=["a"]), OneAxis(), "")
        assert faiss.omp_get_max_threads() == 1
        for thread in (state.predictor_thread, state.background, state.cascade_thread):
            assert thread.submit(faiss.omp_get_max_threads).result() == 1
    finally:
        faiss.omp_set_num_threads(before)


async def test_predictions_carry_each_cascade_query_s_cluster_of_the_current_fit() -> None:
    """The predict stage's vectors give each query of a fitted cascade pool its cluster,
    named by the fit, so the first stage need not embed the query again."""
    budget = PoolPolicy(mode="budget", budget_per_query_usd=1.0)
    settings = Settings(
        router_models=["a", "b"],
        router_pools={"default": budget, "c": budget.model_copy(update={"cascade": True})},
    )
    state = RouterState(settings, OneAxis(), "")
    queries = [QueryEvent(query_id=f"q{i}", text="t", pool=p) for i, p in enumerate("cdc")]
    unfitted = await state.predict(queries)
    assert unfitted.cascade_cluster == [] and unfitted.cascade_fit == []

    seen: list[NDArray[np.float32]] = []

    def clusters(vectors: NDArray[np.float32]) -> NDArray[np.int64]:
        seen.append(vectors)
        return np.arange(len(vectors), dtype=np.int64) + 3

    policy = SimpleNamespace(clusters=clusters, clustering=SimpleNamespace(digest=lambda: "fit-1"))
    fitted = FittedCascade(cast(CascadePolicy, policy), ["a", "b"])
    state.cascades["c"] = fitted
    batch = await state.predict(queries)
    assert batch.cascade_cluster == [3, None, 4]
    assert batch.cascade_fit == [fitted.fit_id, None, fitted.fit_id]
    assert [v.tolist() for v in seen] == [OneAxis().embed(["t", "t"]).tolist()]


async def test_a_cascade_fit_that_fails_keeps_the_pool_s_current_policy() -> None:
    """A fit that raises anything (not only a database error) is logged; the router
    keeps serving the pool with its current policy, at start and on the refit timer."""
    budget = PoolPolicy(mode="budget", budget_per_query_usd=1.0)
    settings = Settings(
        router_models=["a", "b"], router_pools={"c": budget.model_copy(update={"cascade": True})}
    )
    state = RouterState(settings, OneAxis(), "")
    current = cast(FittedCascade, object())
    state.cascades["c"] = current

    def failing(pool: str) -> FittedCascade | None:
        raise ValueError("Input X contains NaN.")

    state._fit_cascade = failing  # type: ignore[method-assign]
    await state.refit_cascades()
    assert state.cascades["c"] is current


def stored_queries(store: RetrievalStore, rng: np.random.Generator, first: int, count: int) -> None:
    """`count` queries on the unit circle, ids from q`first`: model a is right where
    x > 0, model b at random; both scored (two outcomes a query)."""
    angles = rng.uniform(0, 2 * np.pi, count)
    vectors = np.column_stack([np.cos(angles), np.sin(angles)]).astype(np.float32)
    scores = np.column_stack([vectors[:, 0] > 0, rng.random(count) > 0.5]).astype(float)
    ids = [f"q{i}" for i in range(first, first + count)]
    store.add_table(ids, vectors, scores, np.full((count, 2), 0.01))


async def test_the_refit_waits_for_enough_stored_queries_then_swaps_in_fitted_heads() -> None:
    """Below MIN_REFIT_QUERIES the predictor keeps its unfitted heads (retrieval
    alone); from there a refit, run off the serving thread, is what it predicts with."""
    state = RouterState(Settings(router_models=["a", "b"]), OneAxis(), "")
    store_queries = partial(stored_queries, state.predictor.store, np.random.default_rng(0))

    store_queries(0, MIN_REFIT_QUERIES - 1)
    await state.refit()
    assert not state.predictor.heads.fitted and state.predictor.blend_weight == 1.0

    store_queries(MIN_REFIT_QUERIES - 1, 200)
    await state.refit()
    assert state.predictor.heads.fitted
    quality = state.predictor.heads.predict(np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32))
    assert quality[0, 0] > 0.8 > 0.2 > quality[1, 0]  # model a: good where x > 0


def test_a_refit_is_due_once_the_store_grew_by_the_configured_share() -> None:
    least = REFIT_LEAST_NEW_OUTCOMES
    assert not refit_due(least, 0, 0.25) and refit_due(least + 1, 0, 0.25)
    assert not refit_due(1250, 1000, 0.25) and refit_due(1251, 1000, 0.25)
    assert not refit_due(110 + least, 110, 0.25)  # a quarter more, but few new
    assert not refit_due(10_000, 100, 0.0)  # 0: on the timer alone


async def test_the_router_refits_when_its_store_grew_not_before() -> None:
    """ROUTER_REFIT_GROWTH: the refresh after which the store holds a quarter more
    scored outcomes than the heads were fitted on refits them, whatever the timer."""
    state = RouterState(Settings(router_models=["a", "b"], router_refit_growth=0.25), OneAxis(), "")
    store_queries = partial(stored_queries, state.predictor.store, np.random.default_rng(1))

    store_queries(0, 500)  # 1,000 scored outcomes
    assert await state.refit_if_grown()
    assert state.predictor.fitted_outcomes == 1000
    store_queries(500, 125)  # 1,250: not more than a quarter more
    assert not await state.refit_if_grown()
    assert state.predictor.fitted_outcomes == 1000
    store_queries(625, 1)  # 1,252
    assert await state.refit_if_grown()
    assert state.predictor.fitted_outcomes == 1252
