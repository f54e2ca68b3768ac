"""`make demo`: the whole loop on one machine, on the shipped RouterBench sample.

It finds or starts a broker and a database, creates topics and schema, and
starts the router, the outcome writer, replay model workers for the 11 models
(answering without a score, as real models do) and the replay judge (scoring
a share of the answers) as separate processes. The store starts empty unless
`--warm-start N` stores the recorded outcomes of the first N prompts: the
router knows only the models' list prices and learns from the judge as the
sample streams through. It ends with what the routing cost and achieved next
to sending everything to one model, and the learning curve block by block.
It stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas import Assignment, WindowReport
from workers.config import Settings, environment_for_workers, model_topic
from workers.db import migrate
from workers.db.models import OutcomeRow
from workers.db.repository import count_outcomes
from workers.routing.dataset import OutcomeTable, load_routerbench, shipped_sample_path
from workers.routing.embedder import make_embedder
from workers.routing.prices import fitted_prices
from workers.services import demo_database_url, kafka_bootstrap
from workers.stream.kafka_io import read_topic
from workers.stream.replay import produce_queries, query_events, seed_outcomes
from workers.stream.security import aiokafka_options
from workers.stream.topics import create_topics

REPLAY_RATE_QPS = 10.0
JUDGE_SAMPLE_SHARE = 0.3
LEARNING_BLOCK = 100
WINDOW_SECONDS = 2.0
# The demo's budget: 35% of what sending everything to the dearest model costs.
BUDGET_SHARE_OF_DEAREST = 0.35
TIMEOUT_SECONDS = 240


@contextlib.contextmanager
def workers(
    env: dict[str, str], log_dir: Path, judge: bool = False
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The router, the outcome writer, a replay model worker and, with `judge`, the
    replay judge, stopped on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        "router": ["router"],
        "outcomes": ["outcomes"],
        "model-replay": ["model-worker", "replay"],
    }
    if judge:
        commands["judge-replay"] = ["judge", "replay"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args, "--loglevel", "warning"],
            env=env,
            stdout=open(log_dir / f"{name}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for name, args in commands.items()
    ]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for_answers(
    engine: sa.Engine,
    run_id: str,
    expected: int,
    processes: list[subprocess.Popen[bytes]],
    state_dir: Path,
) -> bool:
    """Poll until `expected` queries of the run are answered and stored; False when a
    worker exited or TIMEOUT_SECONDS passed."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while (done := len({r.query_id for r in routed_outcomes(engine, run_id)})) < expected:
        if any(p.poll() is not None for p in processes):
            click.echo(f"[demo] a worker exited; see {state_dir / 'logs'}")
            return False
        if time.monotonic() > deadline:
            click.echo(f"[demo] {done}/{expected} answered after {TIMEOUT_SECONDS}s; giving up")
            return False
        time.sleep(2)
        click.echo(f"[demo] {done}/{expected} queries answered and stored")
    return True


def routed_outcomes(engine: sa.Engine, run_id: str) -> list[OutcomeRow]:
    with Session(engine) as session:
        query = sa.select(OutcomeRow).where(OutcomeRow.query_id.like(f"{run_id}-%"))
        return list(session.scalars(query))


def shadow_pairs(bootstrap: str, settings: Settings) -> set[tuple[str, str]]:
    """(query id, model) of every shadow answer asked (ROUTER_SHADOW_SHARE)."""
    pairs = set()
    for model in settings.router_models:
        for raw in asyncio.run(
            read_topic(bootstrap, model_topic(model), security=aiokafka_options(settings))
        ):
            assignment = Assignment.model_validate_json(raw)
            if assignment.role == "shadow":
                pairs.add((assignment.query_id, assignment.model))
    return pairs


def settled(
    engine: sa.Engine, run_id: str, bootstrap: str, settings: Settings, expected: int
) -> tuple[list[OutcomeRow], set[tuple[str, str]]]:
    """The run's outcomes and shadow pairs once every query's answer is stored (a
    query's shadow answer may be stored before its answer), or at TIMEOUT_SECONDS."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        rows, shadows = routed_outcomes(engine, run_id), shadow_pairs(bootstrap, settings)
        answered = {r.query_id for r in answers_only(rows, shadows)}
        if len(answered) >= expected or time.monotonic() > deadline:
            return rows, shadows
        time.sleep(1)


def answers_only(rows: list[OutcomeRow], shadows: set[tuple[str, str]]) -> list[OutcomeRow]:
    """The outcomes of the queries' answers: a shadow answer is judged, never delivered."""
    return [r for r in rows if (r.query_id, r.model) not in shadows]


@dataclass(frozen=True)
class Spend:
    label: str
    accuracy: float
    cost_usd: float


@dataclass(frozen=True)
class DemoSummary:
    queries_routed: int
    per_model: dict[str, int]
    routed: Spend
    best_single_model: Spend
    dearest_model: Spend
    windows: list[dict[str, object]]
    queries_explored: int
    learning_curve: list[dict[str, float]]
    queries_shadowed: int = 0
    shadow_spend_usd: float = 0.0  # included in the routed cost


def learning_curve(
    live: OutcomeTable, rows: list[OutcomeRow], run_id: str, block: int = LEARNING_BLOCK
) -> list[dict[str, float]]:
    """Accuracy (recorded scores) and cost of the routed traffic per block of
    queries, in the order they were produced."""
    chosen = {int(r.query_id.removeprefix(f"{run_id}-")): r for r in rows}
    curve = []
    for first in range(0, len(live), block):
        picked = [
            (i, chosen[i]) for i in range(first, min(first + block, len(live))) if i in chosen
        ]
        scores = [live.scores[i, live.models.index(r.model)] for i, r in picked]
        curve.append(
            {
                "queries": float(first + len(picked)),
                "accuracy": float(np.nanmean(scores)) if picked else float("nan"),
                "cost_usd": float(sum(r.cost_usd or 0.0 for _, r in picked)),
            }
        )
    return curve


def summarise(
    live: OutcomeTable,
    rows: list[OutcomeRow],
    reports: list[WindowReport],
    run_id: str,
    shadow_spend_usd: float = 0.0,
) -> DemoSummary:
    """The routed traffic next to sending the same queries to one model; accuracy
    from the recorded scores (the judge's, which taught the router, cover a share).
    `rows`: the answers' outcomes; the routed cost includes the shadow answers'."""
    index = [int(r.query_id.removeprefix(f"{run_id}-")) for r in rows]
    subset = live.take(index)
    accuracy = np.nanmean(subset.scores, axis=0)
    totals = np.nansum(subset.costs, axis=0)
    best, dearest = int(np.nanargmax(accuracy)), int(np.argmax(totals))
    scores = [live.scores[i, live.models.index(r.model)] for i, r in zip(index, rows, strict=True)]
    return DemoSummary(
        queries_routed=len(rows),
        per_model=dict(Counter(r.model for r in rows).most_common()),
        routed=Spend(
            "OmniRouter (routed traffic)",
            float(np.nanmean(scores)) if scores else float("nan"),
            float(sum(r.cost_usd or 0.0 for r in rows)) + shadow_spend_usd,
        ),
        best_single_model=Spend(live.models[best], float(accuracy[best]), float(totals[best])),
        dearest_model=Spend(live.models[dearest], float(accuracy[dearest]), float(totals[dearest])),
        windows=[
            {
                "window_id": w.window_id,
                "queries": w.query_count,
                "budget_usd": w.window_budget_usd,
                "predicted_spend_usd": w.predicted_spend_usd,
                "status": w.solver_status,
                "exploration_queries": w.exploration_queries,
            }
            for w in reports
        ],
        queries_explored=sum(w.exploration_queries for w in reports),
        queries_shadowed=sum(w.shadow_queries for w in reports),
        shadow_spend_usd=shadow_spend_usd,
        learning_curve=learning_curve(live, rows, run_id),
    )


def store_at_start(engine: sa.Engine) -> str:
    """Say what the router starts from: the demo's own database is emptied at start,
    a configured DATABASE_URL is used as it is."""
    with Session(engine) as session:
        stored = count_outcomes(session)
    if not stored:
        return "[demo] empty store: the router knows the models' list prices only"
    return (
        f"[demo] the configured database already holds {stored} outcomes: the router starts "
        "from them, not from an empty store (unset DATABASE_URL for a database of the demo's own)"
    )


def demo_budget_per_hour(sample: OutcomeTable) -> float:
    """35% of what sending every query to the dearest model costs, per hour of replay."""
    dearest_per_query = float(np.nanmax(np.nanmean(sample.costs, axis=0)))
    return BUDGET_SHARE_OF_DEAREST * dearest_per_query * REPLAY_RATE_QPS * 3600


def demo_environment(bootstrap: str, database_url: str, sample: OutcomeTable) -> dict[str, str]:
    """The workers' environment: the demo's budget, prices and pace over this process's
    environment (an exported routing policy is not inherited: environment_for_workers)."""
    return environment_for_workers(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": database_url,
            "ROUTER_MODE": "budget",
            "ROUTER_BUDGET_PER_HOUR_USD": f"{demo_budget_per_hour(sample):.6f}",
            "ROUTER_WINDOW_SECONDS": str(WINDOW_SECONDS),
            "ROUTER_MODEL_PRICES": json.dumps(
                {m: p.model_dump() for m, p in fitted_prices(sample).items()}
            ),
            "ROUTER_STORE_REFRESH_SECONDS": "1",
            "ROUTER_REFIT_SECONDS": "30",
            "REPLAY_SCORES": "false",
            "JUDGE_SAMPLE_SHARE": str(JUDGE_SAMPLE_SHARE),
            "HF_HUB_OFFLINE": "1",
        }
    )


def run_demo(settings: Settings, state_dir: Path, warm_start: int = 0) -> int:
    started = time.monotonic()
    sample = load_routerbench(shipped_sample_path())
    warm = sample.take(list(range(warm_start)))
    live = sample.take(list(range(warm_start, len(sample))))
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    with kafka_bootstrap(settings.kafka_bootstrap_servers) as bootstrap:
        click.echo(f"[demo] broker {bootstrap}")
        database_url = demo_database_url(settings.database_url, state_dir)
        migrate.upgrade(database_url)
        engine = sa.create_engine(database_url)
        click.echo(f"[demo] database {engine.url.render_as_string(hide_password=True)} migrated")
        asyncio.run(create_topics(settings, bootstrap))
        click.echo(f"[demo] {len(settings.topic_names())} topics ready")

        if len(warm):
            click.echo(f"[demo] warm start: storing the recorded outcomes of {len(warm)} prompts")
            embedder = make_embedder(settings.router_embedder, Path(settings.embedder_cache_dir))
            stored = seed_outcomes(
                engine, warm, embedder, response_chars=settings.outcome_response_max_chars
            )
            click.echo(f"[demo] stored {stored} outcomes")
        else:
            click.echo(store_at_start(engine))

        budget_per_hour = demo_budget_per_hour(sample)
        env = demo_environment(bootstrap, database_url, sample)
        click.echo(
            f"[demo] budget mode: ${budget_per_hour:.2f}/hour at {REPLAY_RATE_QPS:.0f} queries/s "
            f"(35% of the dearest model), windows of {WINDOW_SECONDS:.0f}s"
        )
        with workers(env, state_dir / "logs", judge=True) as processes:
            click.echo(
                "[demo] metrics: http://127.0.0.1:9101/metrics (router), :9102 (outcome writer), "
                f":9103 (model worker), :9104 (judge, scoring {JUDGE_SAMPLE_SHARE:.0%})"
            )
            queries = query_events(live, run_id)
            produce = functools.partial(
                produce_queries,
                bootstrap,
                settings.topic_names()["queries"],
                security=aiokafka_options(settings),
            )
            # The first query alone: once it is answered every worker is up, and the
            # rest streams into windows as live traffic would, not into one backlog.
            asyncio.run(produce(queries[:1], 0))
            if not wait_for_answers(engine, run_id, 1, processes, state_dir):
                return 1
            click.echo(f"[demo] replaying {len(queries)} queries at {REPLAY_RATE_QPS:.0f}/s ...")
            asyncio.run(produce(queries[1:], REPLAY_RATE_QPS))
            if not wait_for_answers(engine, run_id, len(queries), processes, state_dir):
                return 1
            every_row, shadows = settled(engine, run_id, bootstrap, settings, len(queries))
        rows = answers_only(every_row, shadows)
        raw_reports = asyncio.run(
            read_topic(
                bootstrap, settings.topic_names()["windows"], security=aiokafka_options(settings)
            )
        )
    reports = [WindowReport.model_validate_json(r) for r in raw_reports]
    shadow_spend = sum(r.cost_usd or 0.0 for r in every_row if (r.query_id, r.model) in shadows)
    summary = summarise(live, rows, reports, run_id, shadow_spend)
    print_summary(summary)
    report_path = state_dir / "demo_report.json"
    report_path.write_text(json.dumps(asdict(summary), indent=2))
    click.echo(f"[demo] full report: {report_path}; worker logs: {state_dir / 'logs'}")
    click.echo(f"[demo] done in {time.monotonic() - started:.0f}s")
    return 0 if len(rows) == len(live) else 1


def print_summary(summary: DemoSummary) -> None:
    click.echo(f"\nqueries routed: {summary.queries_routed}")
    for model, count in summary.per_model.items():
        click.echo(f"  {model:40s} {count:5d}")
    click.echo(f"\n{'':42s} {'accuracy':>9} {'cost USD':>10}")
    for label, spend in (
        ("OmniRouter (routed traffic)", summary.routed),
        (f"best single model: {summary.best_single_model.label}", summary.best_single_model),
        (f"dearest model: {summary.dearest_model.label}", summary.dearest_model),
    ):
        click.echo(f"{label:42s} {spend.accuracy:9.3f} {spend.cost_usd:10.4f}")
    click.echo(
        f"\nwindows: {len(summary.windows)}; queries explored: {summary.queries_explored}; "
        f"shadow answers: {summary.queries_shadowed} (${summary.shadow_spend_usd:.4f}, in the "
        "routed cost)"
    )
    click.echo(f"\nlearning curve (blocks of {LEARNING_BLOCK}, in production order)")
    click.echo(f"{'queries':>9} {'accuracy':>9} {'cost USD':>10}")
    for point in summary.learning_curve:
        click.echo(f"{point['queries']:9.0f} {point['accuracy']:9.3f} {point['cost_usd']:10.4f}")
