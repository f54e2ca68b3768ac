"""The whole loop on a real broker and PostgreSQL: workers run as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from schemas import Assignment, DeadLetter, Outcome, PredictedBatch, QueryEvent, WindowReport
from workers.cli import MODEL_WORKER_METRICS_PORT, OUTCOMES_METRICS_PORT, ROUTER_METRICS_PORT
from workers.config import Settings
from workers.db.models import OutcomeRow
from workers.demo import workers
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import Embedder
from workers.services import LocalBroker
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.replay import seed_outcomes
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

POOLS = {
    "gold": {"mode": "budget", "window_budget_usd": 1.0},
    "bronze": {"mode": "budget", "window_budget_usd": 0.0},  # below any plan: cheapest
}


@pytest.fixture
def broker() -> Iterator[str]:
    """A broker of its own: the pipeline's topics start empty."""
    with LocalBroker() as local:
        yield local.bootstrap_servers


def environment(bootstrap: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ROUTER_MODE": "budget",
        "ROUTER_WINDOW_BUDGET_USD": "0.02",
        "ROUTER_POOLS": json.dumps(POOLS),
        "ROUTER_WINDOW_SECONDS": "1",
        "ROUTER_STORE_REFRESH_SECONDS": "1",
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "KAFKA_PARTITIONS": "2",
        "REPLAY_LATENCY_MS": "10",
    }


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def outcome_rows(engine: sa.Engine, prefix: str) -> list[OutcomeRow]:
    with Session(engine) as session:
        return list(
            session.scalars(sa.select(OutcomeRow).where(OutcomeRow.query_id.like(f"{prefix}%")))
        )


def scrape(port: int) -> dict[str, float]:
    """A worker's /metrics: each sample summed over its labels, and by dead-letter kind
    under "<name>|<reason>"."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            totals[sample.name] += sample.value
            if "reason" in sample.labels:
                totals[f"{sample.name}|{sample.labels['reason']}"] += sample.value
    return totals


def read_all(bootstrap: str, topic: str) -> list[bytes]:
    return asyncio.run(read_topic(bootstrap, topic))


def test_queries_are_routed_answered_stored_and_learned_from(
    broker: str, postgres_url: str, tmp_path: Path, router_embedder: Embedder
) -> None:
    env = environment(broker, postgres_url)
    settings = Settings(kafka_partitions=2, router_pools=POOLS)  # type: ignore[arg-type]
    names = settings.topic_names()
    asyncio.run(create_topics(settings, broker))
    sample = load_routerbench(shipped_sample_path())
    engine = sa.create_engine(postgres_url)
    seed_outcomes(engine, sample.take(list(range(60))), router_embedder)

    run = f"t{uuid.uuid4().hex[:6]}"
    pools = ["default", "gold", "bronze"]
    queries = [
        QueryEvent(query_id=f"{run}-{i}", text=sample.prompts[100 + i], pool=pools[i % 3])
        for i in range(30)
    ]
    unknown_pool = QueryEvent(query_id="z", text="hi", pool="platinum")
    malformed = [
        ("bad-json", b'{"query_id": "x", "text": '),
        ("missing-text", json.dumps({"query_id": "y"}).encode()),
        ("unknown-pool", unknown_pool.model_dump_json().encode()),
        ("bad-utf8", b"\xff\xfe\x00"),
    ]
    messages: list[tuple[str, str | bytes]] = [(q.query_id, q.model_dump_json()) for q in queries]
    for position, (key, raw) in enumerate(malformed):
        messages.insert(position * 7 + 3, (key, raw))
    messages.append((queries[0].query_id, queries[0].model_dump_json()))  # a duplicate

    with workers(env, tmp_path / "logs") as processes:
        asyncio.run(produce_values(broker, names["queries"], messages))
        started = time.monotonic()
        wait_for(lambda: len(outcome_rows(engine, f"{run}-")) >= len(queries), 150, "outcomes")
        print(f"{len(queries)} queries answered and stored in {time.monotonic() - started:.1f}s")
        assert all(p.poll() is None for p in processes), "a worker died"

        # Every valid query assigned exactly once, on the topic of its model.
        assigned: Counter[str] = Counter()
        for model in settings.router_models:
            for raw in read_all(broker, names[f"route:{model}"]):
                assignment = Assignment.model_validate_json(raw)
                assert assignment.model == model
                assigned[assignment.query_id] += 1
        assert assigned == Counter({q.query_id: 1 for q in queries})

        # Malformed events are dead letters with their reasons; the rest went through.
        letters = [DeadLetter.model_validate_json(r) for r in read_all(broker, names["deadletter"])]
        reasons = sorted(letter.reason for letter in letters)
        print("dead letters:", reasons)
        assert len(letters) == len(malformed)
        assert any(r.startswith("not JSON") for r in reasons)
        assert any("text: Field required" in r for r in reasons)
        assert any("unknown pool 'platinum'" in r for r in reasons)
        assert any("invalid UTF-8" in r for r in reasons)

        # Per-pool windows, each within its own budget when the budget is reachable.
        reports = [WindowReport.model_validate_json(r) for r in read_all(broker, names["windows"])]
        by_pool = {pool: [w for w in reports if w.pool == pool] for pool in pools}
        assert all(by_pool.values()), by_pool
        assert {w.window_budget_usd for w in by_pool["gold"]} == {1.0}
        assert {w.window_budget_usd for w in by_pool["default"]} == {0.02}
        for report in reports:
            if report.solver_status in ("optimal", "near_optimal"):
                assert report.predicted_spend_usd <= report.window_budget_usd + 1e-9  # type: ignore[operator]
        assert {w.solver_status for w in by_pool["bronze"]} == {"infeasible_budget_cheapest_plan"}
        assert sum(w.query_count for w in reports) == len(queries)

        # Outcomes are in PostgreSQL, one per query, with the replayed score.
        rows = outcome_rows(engine, f"{run}-")
        assert sorted(r.query_id for r in rows) == sorted(q.query_id for q in queries)

        # Outcome events: a late score updates its row; an unknown model, or an unknown
        # query without its text, is a dead letter.
        scored = rows[2]
        assert scored.quality_score is not None
        late = Outcome(
            query_id=scored.query_id, model=scored.model, quality_score=1 - scored.quality_score
        )
        strays = [
            Outcome(query_id=scored.query_id, model="no-such-model", quality_score=1.0),
            Outcome(query_id=f"{run}-never-routed", model=scored.model, quality_score=1.0),
        ]
        asyncio.run(
            produce_values(
                broker,
                names["outcomes"],
                [(o.query_id, o.model_dump_json()) for o in [*strays, late]],
            )
        )

        def rescored() -> bool:
            (now,) = [
                r
                for r in outcome_rows(engine, scored.query_id)
                if (r.query_id, r.model) == (scored.query_id, scored.model)
            ]
            return now.quality_score == late.quality_score and now.cost_usd == scored.cost_usd

        wait_for(rescored, 30, "the late score")
        wait_for(
            lambda: len(read_all(broker, names["deadletter"])) == len(malformed) + len(strays),
            30,
            "the outcomes' dead letters",
        )
        letters = [DeadLetter.model_validate_json(r) for r in read_all(broker, names["deadletter"])]
        outcome_reasons = [
            letter.reason for letter in letters if letter.source_topic == names["outcomes"]
        ]
        assert any("unknown model 'no-such-model'" in r for r in outcome_reasons)
        assert any(
            f"unknown query '{run}-never-routed' without its text" in r for r in outcome_reasons
        )
        assert not outcome_rows(engine, f"{run}-never-routed")

        # The router learned: the same text again is predicted closer to what happened.
        # Not the query rescored above: `rows` holds its score from before the late one.
        first = next(q for q in queries[1:] if q.query_id != scored.query_id)
        (row,) = [r for r in rows if r.query_id == first.query_id]
        assert row.quality_score is not None
        time.sleep(2.5)  # > ROUTER_STORE_REFRESH_SECONDS
        again = QueryEvent(query_id=f"{run}-again", text=first.text, pool=first.pool)
        asyncio.run(
            produce_values(broker, names["queries"], [(again.query_id, again.model_dump_json())])
        )
        wait_for(lambda: len(outcome_rows(engine, f"{run}-again")) == 1, 60, "the repeated query")

        # Each worker's /metrics counts what happened above.
        reports = [WindowReport.model_validate_json(r) for r in read_all(broker, names["windows"])]
        router = scrape(ROUTER_METRICS_PORT)
        assert router["omnirouter_queries_total"] == len(queries) + 2  # + the duplicate, again
        assert router["omnirouter_assignments_total"] == len(queries) + 1
        assert router["omnirouter_windows_total"] == len(reports)
        assert router["omnirouter_window_solve_seconds_count"] == len(reports)
        assert router["omnirouter_predicted_spend_usd_total"] == pytest.approx(
            sum(r.predicted_spend_usd for r in reports)
        )
        for kind in ("not_json", "schema", "unknown_pool", "invalid_utf8"):
            assert router[f"omnirouter_dead_letters_total|{kind}"] == 1, kind
        writer = scrape(OUTCOMES_METRICS_PORT)
        assert writer["omnirouter_outcomes_written_total"] == len(queries) + 2  # + late, again
        assert writer["omnirouter_dead_letters_total|unknown_model"] == 1
        assert writer["omnirouter_dead_letters_total|unknown_query"] == 1
        assert writer["omnirouter_outcome_write_seconds_count"] >= 1
        assert "omnirouter_consumer_lag_messages" in writer
        answered = scrape(MODEL_WORKER_METRICS_PORT)["omnirouter_answers_total"]
        assert answered == len(queries) + 1
    predictions = {
        p.query.query_id: p
        for raw in read_all(broker, names["predicted"])
        for p in PredictedBatch.model_validate_json(raw).predictions()
    }
    column = settings.router_models.index(row.model)
    before = predictions[first.query_id].quality[column]
    after = predictions[again.query_id].quality[column]
    print(f"P(good) of {row.model}: {before:.3f}, outcome {row.quality_score}, then {after:.3f}")
    assert abs(after - row.quality_score) < abs(before - row.quality_score)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ROUTER_POOLS", '{"p": {"mode": "budget", "window_budget_usd": 1, "models": ["gpt-9"]}}',
         "ROUTER_POOLS[p].models names models not in ROUTER_MODELS"),
        ("ROUTER_WINDOW_BUDGET_USD", "-1", "greater than or equal to 0"),
        ("ROUTER_MODE", "budget", "ROUTER_MODE=budget needs its limit"),
    ],
)  # fmt: skip
def test_configuration_errors_stop_the_router_at_start(
    variable: str, value: str, message: str
) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "router"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "invalid configuration" in result.stderr
    assert message in result.stderr
