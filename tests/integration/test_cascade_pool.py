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
from pathlib import Path

import pytest
import sqlalchemy as sa

from schemas import Assignment, ModelResponse, QueryEvent, WindowReport
from tests.faults import caught_up, produce_in_background, start_worker, wait_until
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
SEEDED = 300  # the sample's first prompts: the scorer learns from their answers
QUERIES = 60


@pytest.fixture
def broker() -> Iterator[str]:
    with LocalBroker() as local:
        yield local.bootstrap_servers


def environment(bootstrap: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ROUTER_MODE": "budget",
        "ROUTER_WINDOW_BUDGET_USD": "0.02",
        "ROUTER_POOLS": json.dumps(POOLS),
        "ROUTER_WINDOW_SECONDS": "1",
        "ROUTER_STORE_REFRESH_SECONDS": "1",
        "ROUTER_REFIT_SECONDS": "3600",
        "CASCADE_MIN_OUTCOMES": "100",
        "CASCADE_PROBE_DEADLINE_SECONDS": "30",
        "KAFKA_PARTITIONS": "2",
        "REPLAY_LATENCY_MS": "10",
        "METRICS_PORT": "0",
    }


def finals(bootstrap: str, topic: str, prefix: str) -> tuple[Counter[str], Counter[str]]:
    """Per query, its final answers; and every response's role, over the run's queries."""
    final: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    for record in asyncio.run(read_records(bootstrap, [topic])):
        response = ModelResponse.model_validate_json(record.value or b"")
        if response.query_id.startswith(prefix):
            roles[f"{response.role}{' (final)' if response.final else ''}"] += 1
            final[response.query_id] += response.final
    return final, roles


def seeded(bootstrap: str, database_url: str, embedder: Embedder) -> list[str]:
    """Topics made and the store seeded; the prompts the test's queries carry."""
    settings = Settings(kafka_partitions=2, router_pools=POOLS)  # type: ignore[arg-type]
    asyncio.run(create_topics(settings, bootstrap))
    sample = load_routerbench(shipped_sample_path())
    seed_outcomes(sa.create_engine(database_url), sample.take(list(range(SEEDED))), embedder)
    return sample.prompts[SEEDED : SEEDED + QUERIES]


def test_every_query_of_a_cascade_pool_has_exactly_one_final_answer(
    broker: str, postgres_url: str, tmp_path: Path, router_embedder: Embedder
) -> None:
    prompts = seeded(broker, postgres_url, router_embedder)
    names = Settings(kafka_partitions=2).topic_names()
    env = environment(broker, postgres_url)
    run = f"c{time.monotonic_ns() % 10**8}"
    queries = [
        QueryEvent(query_id=f"{run}-{i}", text=text, pool="cascade")
        for i, text in enumerate(prompts)
    ]
    processes = [
        start_worker(command, env, tmp_path / f"{command.split()[0]}.log")
        for command in ("router", "outcomes", "model-worker replay")
    ]
    try:
        produce_in_background(broker, names["queries"], queries, 30.0).join()
        wait_until(
            lambda: len(finals(broker, names["responses"], run)[0]) == QUERIES,
            90,
            "a final answer for every query",
        )
        wait_until(
            lambda: caught_up(broker, ROUTER_APP_ID, [names["probed"], names["responses"]]),
            30,
            "the router to read every probe answer and probed query",
        )
        final, roles = finals(broker, names["responses"], run)
        reports = [
            WindowReport.model_validate_json(r.value or b"")
            for r in asyncio.run(read_records(broker, [names["windows"]]))
        ]
        print("responses by role:", dict(roles))
        escalation_windows = [w for w in reports if ":escalation:" in w.window_id]
        print(
            f"windows: {len(reports) - len(escalation_windows)} first-stage, "
            f"{len(escalation_windows)} escalation; probed {sum(w.probe_queries for w in reports)}"
            f", escalated {sum(w.escalation_queries for w in reports)}"
        )
        assert all(p.poll() is None for p in processes), "a worker died"
        assert final == Counter({q.query_id: 1 for q in queries})
        assert sum(w.probe_queries for w in reports) > 0, "no query was probed"
        assert roles["probe"] == 2 * sum(w.probe_queries for w in reports)
        # The escalations spend no more than the first stages kept back for them.
        kept = sum(w.escalation_reserve_usd for w in reports)
        spent = sum(w.escalation_spend_usd for w in reports)
        assert spent <= kept + 1e-9, (spent, kept)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


def assignments(bootstrap: str, topics: list[str], prefix: str) -> Counter[tuple[str, str]]:
    """(query id, role) -> assignments published, over the route topics."""
    seen: Counter[tuple[str, str]] = Counter()
    for record in asyncio.run(read_records(bootstrap, topics)):
        assignment = Assignment.model_validate_json(record.value or b"")
        if assignment.query_id.startswith(prefix):
            seen[assignment.query_id, assignment.role] += 1
    return seen
