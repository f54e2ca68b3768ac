"""`omnirouter bench predictor`: CPU time per query of the router's predictor thread, by stage.

The predictor alone, as a router's predictor thread runs it: micro-batches of
short queries (ROUTER_PREDICT_BATCH) against a store of synthetic outcomes
(random unit vectors, one model's outcome per query, as `bench pipeline` seeds
the database), heads fitted on the store's last ROUTER_REFIT_MAX_OUTCOMES and
blended half and half (random outcomes give the blend nothing to choose by;
half counts the heads' cost, as a router whose blend uses them), FAISS on the
router's one thread. Each stage is timed by the process's CPU time (the
tokenizer works on threads of its own) around its own call on the same batches,
so a stage's figure holds its callees (FAISS search is inside the k-NN
estimates, which are inside a prediction). Stages are timed one after another
over all batches, then again in a second round; the lower of the two rounds is
printed, as the machine is shared.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss

from workers.bench.pipeline import synthetic_outcomes
from workers.config import Settings
from workers.routing.embedder import Embedder
from workers.routing.predictor import HybridPredictor, KnnSettings, cluster_uncertainty, fit_hybrid
from workers.routing.static_embedder import StaticEmbedder
from workers.routing.store import OutcomeRecord, RetrievalStore
from workers.stream.router_state import FAISS_THREADS

ROUNDS = 2


@dataclass(frozen=True)
class PredictorBench:
    predictor: HybridPredictor
    batches: list[list[str]]

    @property
    def queries(self) -> int:
        return sum(len(b) for b in self.batches)


def synthetic_store(models: Sequence[str], embedder: Embedder, outcomes: int) -> RetrievalStore:
    """The store of `outcomes` synthetic past outcomes, as `bench pipeline` seeds the
    database, vectors labelled as the embedder's."""
    store = RetrievalStore(models, embedder.dimension, embedder=embedder.name)
    for chunk, vectors in synthetic_outcomes(outcomes, models, embedder.dimension):
        store.add_stored(
            OutcomeRecord(
                query_id=o.query_id,
                model=o.model,
                quality_score=o.quality_score,
                cost_usd=o.cost_usd,
                output_tokens=o.output_tokens,
                embedding=vector,
                embedder=embedder.name,
            )
            for o, vector in zip(chunk, vectors, strict=True)
        )
    return store


def prepare(
    settings: Settings, embedder: Embedder, texts: Sequence[str], outcomes: int, batches: int
) -> PredictorBench:
    faiss.omp_set_num_threads(FAISS_THREADS)
    store = synthetic_store(settings.router_models, embedder, outcomes)
    knn = KnnSettings(
        neighbours=settings.router_knn_neighbours, prior_strength=settings.router_prior_strength
    )
    predictor = HybridPredictor(
        embedder,
        store,
        settings.router_model_prices,
        knn,
        model_priors=settings.router_model_priors,
    )
    vectors, scores, costs = store.snapshot(settings.router_refit_max_outcomes)
    # Half and half, whatever the fit chose: the bench times both parts.
    predictor.use(fit_hybrid(vectors, scores, costs, knn)._replace(blend_weight=0.5))
    size = settings.router_predict_batch
    cycled = [texts[i % len(texts)] for i in range(size * batches)]
    return PredictorBench(predictor, [cycled[i : i + size] for i in range(0, len(cycled), size)])


def stages(bench: PredictorBench) -> dict[str, Callable[[list[str]], object]]:
    """Each stage as a call on a batch of texts (vectors embedded once, ahead)."""
    predictor = bench.predictor
    store, embedder = predictor.store, predictor.embedder
    vectors = {id(b): embedder.embed(b) for b in bench.batches}
    chars = {id(b): [len(t) for t in b] for b in bench.batches}
    named: dict[str, Callable[[list[str]], object]] = {"embed": embedder.embed}
    if isinstance(embedder, StaticEmbedder):
        tokens = {id(b): embedder.tokenize(b) for b in bench.batches}
        named["embed: tokenize"] = embedder.tokenize
        named["embed: pool"] = lambda b: embedder.pool(tokens[id(b)])
    k = predictor.knn.neighbours
    named |= {
        "faiss search": lambda b: store.search(vectors[id(b)], k),
        "cluster assign": lambda b: store.clusters.assign(vectors[id(b)]),
        "trained heads": lambda b: predictor.heads.predict(vectors[id(b)]),
        "cluster uncertainty": lambda b: cluster_uncertainty(store, vectors[id(b)]),
        "predict_embedded (all but embed)": lambda b: predictor.predict_embedded(
            vectors[id(b)], chars[id(b)]
        ),
        "predict (all)": predictor.predict,
    }
    return named


def cpu_ms_per_query(bench: PredictorBench) -> dict[str, float]:
    """Each stage's thread CPU time per query, the lower of ROUNDS rounds."""
    named = stages(bench)
    best = dict.fromkeys(named, float("inf"))
    for _ in range(ROUNDS):
        for name, stage in named.items():
            started = time.process_time()
            for batch in bench.batches:
                stage(batch)
            spent = (time.process_time() - started) * 1000 / bench.queries
            best[name] = min(best[name], spent)
    return best


def profile(bench: PredictorBench, top: int = 25) -> str:
    """cProfile's functions of whole predictions, by own time."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for batch in bench.batches:
        bench.predictor.predict(batch)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()
