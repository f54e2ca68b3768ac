"""`omnirouter bench cascade`: latency of a cascade pool's direct, accepted-probe and
escalated queries, produce -> final answer, on a local broker and PostgreSQL.

The store holds the shipped sample's first prompts with every model's recorded
answer and score; the router, the outcome writer and a replay model worker run
as processes; queries (the sample's later prompts) are produced at a steady
rate to a cascade pool. Each query's latency is its final answer's timestamp on
omnirouter.responses less its own on omnirouter.queries. A direct answer waits
for one window and one model; an escalated query for two windows, the probes'
and the escalation model's answers; an accepted probe for two windows and the
probes. The pool is in budget mode, or in quality mode with a `quality_target`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from schemas import ModelResponse, QueryEvent, WindowReport
from workers.config import ROUTER_APP_ID, environment_for_workers, load_settings
from workers.db import migrate
from workers.demo import workers
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import make_embedder
from workers.services import LocalBroker, throwaway_postgres
from workers.stream.kafka_io import group_state, read_records
from workers.stream.replay import produce_queries, seed_outcomes
from workers.stream.topics import create_topics

POOL = "cascade"
SEEDED_PROMPTS = 200


@dataclass(frozen=True)
class CascadeLatency:
    count: int
    p50_seconds: float
    p99_seconds: float


@dataclass(frozen=True)
class CascadeFigures:
    latency: dict[str, CascadeLatency]  # by how the query was answered
    probed: int
    escalated: int
    spend_usd: float  # predicted, every window of the pool
    budget_usd: float | None  # the first-stage windows' budgets (budget mode)
    # Quality mode: the target, and the first-stage windows' predicted mean quality
    # (each window's own mean, weighted by its queries).
    quality_target: float | None = None
    first_stage_quality: float | None = None
    # Quality mode: first-stage windows, and those whose plan reads below the target.
    first_stage_windows: int = 0
    windows_short_of_target: int = 0


def kind_of(response: ModelResponse) -> str:
    return {"answer": "direct", "probe": "accepted probe", "escalation": "escalated"}[response.role]


def run(
    queries: int = 300,
    rate_per_second: float = 20.0,
    window_seconds: float = 1.0,
    model_latency_ms: float = 200.0,
    budget_per_query_usd: float = 0.0018,
    log_dir: Path = Path(".omnirouter/bench-cascade"),
    progress: Callable[[str], None] = print,
    quality_target: float | None = None,
) -> CascadeFigures:
    """Run the bench; with `quality_target` the pool is in quality mode (the budget
    per query is then unused)."""
    settings = load_settings()
    sample = load_routerbench(shipped_sample_path())
    embedder = make_embedder(settings.router_embedder, Path(settings.embedder_cache_dir))
    pools = {POOL: pool_policy(budget_per_query_usd, quality_target)}
    later = sample.prompts[SEEDED_PROMPTS:]
    run_id = f"b{time.time_ns() % 10**9}"
    events = [
        QueryEvent(query_id=f"{run_id}-{i}", text=later[i % len(later)], pool=POOL)
        for i in range(queries)
    ]
    with LocalBroker() as broker, throwaway_postgres() as database_url:
        bootstrap = broker.bootstrap_servers
        migrate.upgrade(database_url)
        asyncio.run(create_topics(settings, bootstrap))
        seed_outcomes(
            sa.create_engine(database_url), sample.take(list(range(SEEDED_PROMPTS))), embedder
        )
        env = environment_for_workers(
            {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "DATABASE_URL": database_url,
                "ROUTER_POOLS": json.dumps(pools),
                "ROUTER_WINDOW_SECONDS": str(window_seconds),
                "ROUTER_REFIT_SECONDS": "3600",
                "ROUTER_REFIT_GROWTH": "0",
                "REPLAY_LATENCY_MS": str(model_latency_ms),
                "CASCADE_MIN_OUTCOMES": str(SEEDED_PROMPTS // 2),
                "EMBEDDER_CACHE_DIR": str(Path(settings.embedder_cache_dir).resolve()),
            }
        )
        names = settings.topic_names()
        with workers(env, log_dir):
            wait_for_router(bootstrap, log_dir / "router.log", progress)
            asyncio.run(produce_queries(bootstrap, names["queries"], events, rate_per_second))
            progress(f"produced {queries} queries at {rate_per_second:.0f}/s")
            finals = wait_for_finals(bootstrap, names["responses"], run_id, queries)
        produced = {
            (r.key or b"").decode(): r.timestamp
            for r in asyncio.run(read_records(bootstrap, [names["queries"]]))
        }
        reports = [
            WindowReport.model_validate_json(r.value or b"")
            for r in asyncio.run(read_records(bootstrap, [names["windows"]]))
        ]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for query_id, (response, stamp) in finals.items():
        by_kind[kind_of(response)].append((stamp - produced[query_id]) / 1000)
    pool_reports = [w for w in reports if w.pool == POOL]
    first_stages = [w for w in pool_reports if ":escalation:" not in w.window_id]
    return CascadeFigures(
        latency={
            kind: CascadeLatency(
                len(values), float(np.percentile(values, 50)), float(np.percentile(values, 99))
            )
            for kind, values in sorted(by_kind.items())
        },
        probed=sum(w.probe_queries for w in pool_reports),
        escalated=sum(w.escalation_queries for w in pool_reports),
        spend_usd=sum(w.predicted_spend_usd for w in pool_reports),
        budget_usd=(
            None
            if quality_target is not None
            else sum(w.window_budget_usd or 0.0 for w in first_stages)
        ),
        quality_target=quality_target,
        first_stage_quality=(
            None if quality_target is None else weighted_mean_quality(first_stages)
        ),
        first_stage_windows=len(first_stages),
        windows_short_of_target=sum(
            w.predicted_mean_quality < (w.quality_target or 0.0) - 1e-9 for w in first_stages
        ),
    )


def pool_policy(budget_per_query_usd: float, quality_target: float | None) -> dict[str, object]:
    """The bench's cascade pool: budget mode, or quality mode at `quality_target`."""
    if quality_target is None:
        return {"mode": "budget", "budget_per_query_usd": budget_per_query_usd, "cascade": True}
    return {"mode": "quality", "quality_target": quality_target, "cascade": True}


def weighted_mean_quality(reports: list[WindowReport]) -> float:
    """The windows' predicted mean quality over all their queries."""
    queries = sum(w.query_count for w in reports)
    return sum(w.predicted_mean_quality * w.query_count for w in reports) / max(queries, 1)


def wait_for_router(bootstrap: str, log: Path, progress: Callable[[str], None]) -> None:
    """Until the router has fitted the cascade (before it joins) and joined its group."""
    deadline = time.monotonic() + 300
    while asyncio.run(group_state(bootstrap, ROUTER_APP_ID))[0] != "Stable":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router did not start; see {log}")
        time.sleep(0.5)
    progress("router ready")


def wait_for_finals(
    bootstrap: str, topic: str, run_id: str, expected: int, timeout_seconds: float = 300
) -> dict[str, tuple[ModelResponse, int]]:
    """Each query's first final answer and its timestamp (ms), once every query has one."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        finals: dict[str, tuple[ModelResponse, int]] = {}
        for record in asyncio.run(read_records(bootstrap, [topic])):
            response = ModelResponse.model_validate_json(record.value or b"")
            if response.final and response.query_id.startswith(run_id):
                finals.setdefault(response.query_id, (response, record.timestamp))
        if len(finals) >= expected:
            return finals
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expected - len(finals)} queries without a final answer")
        time.sleep(1.0)
