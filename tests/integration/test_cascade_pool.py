"""A cascade pool end to end on a real broker and PostgreSQL, workers as processes:
probes, the gatherer, the escalation stage, replay model workers. Every query ends
with exactly one final answer on omnirouter.responses (counted over every
committed message), also when the router is killed between probe and escalation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from schemas import Assignment, ModelResponse, ProbedQuery, QueryEvent, WindowReport
from tests.faults import caught_up, poll_until, produce_in_background, start_worker, wait_until
from workers.config import ROUTER_APP_ID, Settings
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import Embedder
from workers.services import LocalBroker
from workers.stream.kafka_io import read_records
from workers.stream.replay import seed_outcomes
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

PANEL = ["mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat"]
POOLS = {
    "cascade": {
        "mode": "budget",
        "budget_per_query_usd": 0.0018,  # about 35% of gpt-4's mean cost in the sample
        "cascade": True,
        "cascade_panel": PANEL,
    }
}
CAPACITIES = {"gpt-4-1106-preview": 2, PANEL[0]: 20}
SEEDED = 200  # the sample's first prompts: the scorer learns from their answers
QUERIES = 60
# A router's start fits the cascade on the seeded answers (about 12 s idle, well over
# a minute on a loaded 2-core machine, where 90 s timed out): a deadline, not a wait.
STARTED_AND_ROUTED_SECONDS = 240


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """The memory-only broker (generation-checked decisions), or with
    `transactions` the persistent one (the router publishes in transactions)."""
    if getattr(request, "param", None) == "transactions":
        yield request.getfixturevalue("persistent_broker").bootstrap_servers
        return
    with LocalBroker() as local:
        yield local.bootstrap_servers


def environment(
    bootstrap: str, database_url: str, pools: dict[str, dict[str, object]] = POOLS
) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ROUTER_MODE": "budget",
        "ROUTER_WINDOW_BUDGET_USD": "0.02",
        "ROUTER_POOLS": json.dumps(pools),
        "ROUTER_WINDOW_SECONDS": "1",
        "ROUTER_STORE_REFRESH_SECONDS": "1",
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "CASCADE_MIN_OUTCOMES": "100",
        "CASCADE_PROBE_DEADLINE_SECONDS": "30",
        "KAFKA_PARTITIONS": "2",
        "REPLAY_LATENCY_MS": "10",
        "METRICS_PORT": "0",
    }


def finals(bootstrap: str, topic: str, prefix: str) -> tuple[Counter[str], Counter[str]]:
    """Per query, its final answers; and every response's role ("exploration answer"
    where it answered an exploration), over the run's queries."""
    final: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    for record in asyncio.run(read_records(bootstrap, [topic])):
        response = ModelResponse.model_validate_json(record.value or b"")
        if response.query_id.startswith(prefix):
            explored = "exploration " if response.exploration else ""
            roles[f"{explored}{response.role}{' (final)' if response.final else ''}"] += 1
            final[response.query_id] += response.final
    return final, roles


def seeded(bootstrap: str, database_url: str, embedder: Embedder) -> list[str]:
    """Topics made and the store seeded; the prompts the test's queries carry."""
    settings = Settings(kafka_partitions=2, router_pools=POOLS)  # type: ignore[arg-type]
    asyncio.run(create_topics(settings, bootstrap))
    sample = load_routerbench(shipped_sample_path())
    seed_outcomes(sa.create_engine(database_url), sample.take(list(range(SEEDED))), embedder)
    return sample.prompts[SEEDED : SEEDED + QUERIES]


@pytest.mark.parametrize("broker", ["no-transactions", "transactions"], indirect=True)
def test_every_query_of_a_cascade_pool_has_exactly_one_final_answer(
    broker: str,
    postgres_url: str,
    tmp_path: Path,
    router_embedder: Embedder,
    request: pytest.FixtureRequest,
) -> None:
    prompts = seeded(broker, postgres_url, router_embedder)
    transactions = request.node.callspec.params["broker"] == "transactions"
    # With transactions required, a router on a broker without them would not start.
    env = {
        **environment(broker, postgres_url),
        "KAFKA_TRANSACTIONS": "on" if transactions else "off",
        "ROUTER_EXPLORATION_SHARE": "0.2",
        # The dear model rate-limited: direct answers and escalations within 2 a
        # window; a panel model within 20, its probes included.
        "ROUTER_MODEL_CAPACITIES": json.dumps(CAPACITIES),
    }
    pool = run_cascade_pool(broker, env, prompts, tmp_path)
    final, roles, reports = pool.final, pool.roles, pool.reports
    print("responses by role:", dict(roles))
    escalation_windows = [w for w in reports if ":escalation:" in w.window_id]
    print(
        f"windows: {len(reports) - len(escalation_windows)} first-stage, "
        f"{len(escalation_windows)} escalation; probed {sum(w.probe_queries for w in reports)}"
        f", escalated {sum(w.escalation_queries for w in reports)}"
    )
    assert final == Counter({q.query_id: 1 for q in pool.queries})
    assert sum(w.probe_queries for w in reports) > 0, "no query was probed"
    assert roles["probe"] == 2 * sum(w.probe_queries for w in reports)
    # The escalations spend no more than the first stages kept back for them.
    kept = sum(w.escalation_reserve_usd for w in reports)
    spent = sum(w.escalation_spend_usd for w in reports)
    assert spent <= kept + 1e-9, (spent, kept)
    # Exploration answers directly, marked so, and spends at most its share of the
    # first stages' budgets (what it leaves is carried on), paid within each
    # window's budget with its direct answers and probes, before the reserve.
    first = sorted(
        (w for w in reports if ":escalation:" not in w.window_id), key=lambda w: w.window_end
    )
    explored = sum(w.exploration_queries for w in first)
    assert explored > 0 and roles["exploration answer (final)"] == explored
    allowance = sum(w.exploration_spend_usd for w in first) + first[-1].exploration_carried_usd
    assert allowance <= 0.2 * sum(w.window_budget_usd or 0.0 for w in first) + 1e-9
    for w in first:
        assert w.predicted_spend_usd + w.escalation_reserve_usd <= (w.window_budget_usd or 0) + 1e-9
    # Every window, first stage or escalations, within the capacities.
    for model, cap in CAPACITIES.items():
        loads = [w.assignments_per_model.get(model, 0) for w in reports]
        print(f"{model} per window: {loads}")
        assert all(load <= cap for load in loads), (model, loads)


@dataclass(frozen=True)
class PoolRun:
    """What a cascade pool did with the run's queries: each query's final answers,
    every response's role (`finals`; an exploration's marked so), and the run's
    window reports."""

    run: str  # the prefix of the run's query ids
    queries: list[QueryEvent]
    final: Counter[str]
    roles: Counter[str]
    reports: list[WindowReport]


def run_cascade_pool(
    bootstrap: str, env: dict[str, str], prompts: list[str], tmp_path: Path
) -> PoolRun:
    """Router, outcome writer and replay models as processes; the prompts produced at
    30/s to the pool "cascade"; read once every query has a final answer and the
    router has read every probe answer and probed query. The workers must still be
    alive then; they are stopped (SIGTERM) on the way out."""
    names = Settings(kafka_partitions=2).topic_names()
    run = f"c{time.monotonic_ns() % 10**8}"
    started = datetime.now(UTC)
    queries = [
        QueryEvent(query_id=f"{run}-{i}", text=text, pool="cascade")
        for i, text in enumerate(prompts)
    ]
    processes = [
        start_worker(command, env, tmp_path / f"{command.split()[0]}.log")
        for command in ("router", "outcomes", "model-worker replay")
    ]
    try:
        produce_in_background(bootstrap, names["queries"], queries, 30.0).join()
        wait_until(
            lambda: (
                sum(n > 0 for n in finals(bootstrap, names["responses"], run)[0].values())
                == QUERIES
            ),
            STARTED_AND_ROUTED_SECONDS,
            "a final answer for every query",
        )
        wait_until(
            lambda: caught_up(bootstrap, ROUTER_APP_ID, [names["probed"], names["responses"]]),
            30,
            "the router to read every probe answer and probed query",
        )
        final, roles = finals(bootstrap, names["responses"], run)
        windows = asyncio.run(read_records(bootstrap, [names["windows"]]))
        reports = [WindowReport.model_validate_json(r.value or b"") for r in windows]
        # The run's windows: an earlier run's on the same broker ended before it began.
        reports = [w for w in reports if w.window_end >= started]
        assert all(p.poll() is None for p in processes), "a worker died"
        return PoolRun(run, queries, final, roles, reports)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


def test_a_quality_mode_cascade_pool_meets_its_target_on_predictions(
    postgres_url: str, tmp_path: Path, router_embedder: Embedder
) -> None:
    """A cascade pool in quality mode: every query one final answer; each first-stage
    window plans at least the target and each escalation window reaches what its
    queries' first stages asked of them (ProbedQuery.quality_needed)."""
    target = 0.8
    pools = {"cascade": {**POOLS["cascade"], "mode": "quality", "quality_target": target}}
    del pools["cascade"]["budget_per_query_usd"]
    with LocalBroker() as local:
        bootstrap = local.bootstrap_servers
        prompts = seeded(bootstrap, postgres_url, router_embedder)
        env = {**environment(bootstrap, postgres_url, pools), "KAFKA_TRANSACTIONS": "off"}
        pool = run_cascade_pool(bootstrap, env, prompts, tmp_path)
        probed = [
            ProbedQuery.model_validate_json(r.value or b"")
            for r in asyncio.run(read_records(bootstrap, [Settings().topic_names()["probed"]]))
        ]
    final, roles, reports, queries = pool.final, pool.roles, pool.reports, pool.queries
    print("responses by role:", dict(roles))
    assert final == Counter({q.query_id: 1 for q in queries})
    first = [w for w in reports if ":escalation:" not in w.window_id]
    escalation = [w for w in reports if ":escalation:" in w.window_id]
    print(
        f"windows: {len(first)} first-stage, {len(escalation)} escalation; probed "
        f"{sum(w.probe_queries for w in first)}, escalated "
        f"{sum(w.escalation_queries for w in escalation)}; mean quality planned "
        + " ".join(f"{w.predicted_mean_quality:.3f}" for w in first)
        + "; needed / reached "
        + " ".join(f"{w.quality_target:.3f}/{w.predicted_mean_quality:.3f}" for w in escalation)
    )
    assert sum(w.probe_queries for w in first) > 0, "no query was probed"
    assert all(w.mode == "quality" and w.quality_target == target for w in first)
    assert all(w.predicted_mean_quality >= target - 1e-9 for w in first)
    needs = [p.quality_needed for p in probed if p.predicted.query.query_id.startswith(pool.run)]
    assert needs and all(need is not None for need in needs)
    assert escalation and all(w.mode == "quality" for w in escalation)
    assert all(w.predicted_mean_quality >= (w.quality_target or 0.0) - 1e-9 for w in escalation)
    # Each probed query is decided in one escalation window, which asks the mean of
    # what its queries' first stages asked.
    asked = sum((w.quality_target or 0.0) * w.query_count for w in escalation)
    assert asked == pytest.approx(sum(need or 0.0 for need in needs))
    assert sum(w.escalation_reserve_usd for w in reports) == 0.0  # nothing kept back


def decided(bootstrap: str, topics: list[str], prefix: str) -> dict[str, list[tuple[str, ...]]]:
    """Query id -> every (role, model, window id) assignment published for it."""
    seen: dict[str, list[tuple[str, ...]]] = {}
    for record in asyncio.run(read_records(bootstrap, topics)):
        a = Assignment.model_validate_json(record.value or b"")
        if a.query_id.startswith(prefix):
            seen.setdefault(a.query_id, []).append((a.role, a.model, a.window_id))
    return seen


def unanswered(bootstrap: str, routes: list[str], names: dict[str, str], run: str) -> str:
    """For a failure message: each query without a final answer, its assignments and
    every response and probed query seen for it."""
    finals = final_answers(bootstrap, names["responses"], run)
    responses: dict[str, list[str]] = {}
    for record in asyncio.run(read_records(bootstrap, [names["responses"]])):
        r = ModelResponse.model_validate_json(record.value or b"")
        responses.setdefault(r.query_id, []).append(f"{r.role}:{r.model}:{bool(r.error)}")
    probed = Counter(
        ProbedQuery.model_validate_json(r.value or b"").predicted.query.query_id
        for r in asyncio.run(read_records(bootstrap, [names["probed"]]))
    )
    sent = decided(bootstrap, routes, run)
    missing = sorted(set(sent) - set(finals))
    return "; ".join(
        f"{q}: assigned {[(r, m) for r, m, _ in sent[q]]}, responses {responses.get(q)}, "
        f"probed {probed[q]}"
        for q in missing
    )


def final_answers(bootstrap: str, topic: str, prefix: str) -> dict[str, list[tuple[str, ...]]]:
    """Query id -> every final answer published for it, (model, role, response)."""
    seen: dict[str, list[tuple[str, ...]]] = {}
    for record in asyncio.run(read_records(bootstrap, [topic])):
        r = ModelResponse.model_validate_json(record.value or b"")
        if r.query_id.startswith(prefix) and r.final:
            seen.setdefault(r.query_id, []).append((r.model, r.role, r.response or ""))
    return seen


@pytest.mark.parametrize("broker", ["no-transactions", "transactions"], indirect=True)
def test_a_router_killed_between_probe_and_escalation_loses_and_doubles_nothing(
    broker: str,
    postgres_url: str,
    tmp_path: Path,
    router_embedder: Embedder,
    request: pytest.FixtureRequest,
) -> None:
    """kill -9 once probes are out and their answers not back (slow models): the new
    router gathers the rest, escalates or accepts each probed query once. On the
    persistent broker the broker restarts before the new router, as in
    test_crash_recovery.py (noida-db keeps a killed member in its group)."""
    prompts = seeded(broker, postgres_url, router_embedder)
    settings = Settings(kafka_partitions=2)
    names = settings.topic_names()
    routes = [names[f"route:{m}"] for m in settings.router_models]
    transactions = request.node.callspec.params["broker"] == "transactions"
    env = {
        **environment(broker, postgres_url),
        "REPLAY_LATENCY_MS": "2000",
        "KAFKA_TRANSACTIONS": "on" if transactions else "off",
    }
    run = f"k{time.monotonic_ns() % 10**8}"
    queries = [
        QueryEvent(query_id=f"{run}-{i}", text=text, pool="cascade")
        for i, text in enumerate(prompts)
    ]
    log = tmp_path / "router.log"
    router = start_worker("router", env, log)
    others = [
        start_worker(command, env, tmp_path / f"{command.split()[0]}.log")
        for command in ("outcomes", "model-worker replay")
    ]
    try:
        produce_in_background(broker, names["queries"], queries, 30.0)

        def probes_out() -> bool:
            roles = [r for sent in decided(broker, routes, run).values() for r, *_ in sent]
            return roles.count("probe") >= 10

        wait_until(probes_out, STARTED_AND_ROUTED_SECONDS, "probes published")
        before = final_answers(broker, names["responses"], run)
        router.send_signal(signal.SIGKILL)
        router.wait(timeout=10)
        probed_before = sum(1 for sent in decided(broker, routes, run).values()
                            if any(r == "probe" for r, *_ in sent))  # fmt: skip
        if transactions:
            # The model worker and the outcome writer do not come back from a broker
            # restart (after re-joining their group they stay at "Seek stream
            # partitions to committed offsets"): they are started anew with it.
            for process in others:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
            request.getfixturevalue("persistent_broker").restart()
            others = [
                start_worker(command, env, tmp_path / f"{command.split()[0]}.log")
                for command in ("outcomes", "model-worker replay")
            ]
        router = start_worker("router", env, log)
        if not poll_until(
            lambda: len(final_answers(broker, names["responses"], run)) == QUERIES, 120
        ):
            raise AssertionError(
                "no final answer after the restart: " + unanswered(broker, routes, names, run)
            )
        wait_until(
            lambda: caught_up(broker, ROUTER_APP_ID, [names["probed"], names["responses"]]),
            60,
            "the router to read every probe answer and probed query",
        )
        answers = final_answers(broker, names["responses"], run)
        sent = decided(broker, routes, run)
        lost = {q.query_id for q in queries} - set(answers)
        doubled = {q: a for q, a in answers.items() if len(set(a)) > 1}
        resent = sum(len(a) - len(set(a)) for a in answers.values())
        # A query's first decision (answer, or its probes) is made once: one window.
        first_twice = {
            q: s for q, s in sent.items()
            if len({w for r, _, w in s if r in ("answer", "probe")}) > 1
        }  # fmt: skip
        escalated_twice = {
            q: s for q, s in sent.items() if len({(m, w) for r, m, w in s if r == "escalation"}) > 1
        }  # fmt: skip
        print(
            f"produced {QUERIES}, finals before the kill {len(before)}, probed before the kill "
            f"{probed_before}, finals {len(answers)}, lost {len(lost)}, doubled {len(doubled)}, "
            f"identical re-sends {resent}, first decision twice {len(first_twice)}, "
            f"escalated twice {len(escalated_twice)}"
        )
        assert len(before) < QUERIES, "the kill came after every query was final"
        assert not lost and not doubled and not first_twice and not escalated_twice
        assert router.poll() is None and all(p.poll() is None for p in others)
    finally:
        for process in [router, *others]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [router, *others]:
            process.wait(timeout=30)
