"""Scale-out, proven: three router processes in one consumer group share a stream;
one is killed with SIGKILL mid-stream, a new one joins later, and a second one
is killed after that, all in one run. Every assignment on every route topic is
counted: no query lost, none decided twice (two different models), every
window within its budget.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import QueryEvent, WindowReport
from tests.faults import (
    decisions,
    produce_in_background,
    seeded_router_services,
    start_worker,
    wait_until,
)
from workers.config import ROUTER_APP_ID, Settings
from workers.routing.embedder import Embedder
from workers.services import LocalBroker
from workers.stream.kafka_io import group_state, read_topic

pytestmark = pytest.mark.integration

QUERIES = 600
RATE = 20.0  # queries per second: a 30 s stream
BUDGET_PER_QUERY = 0.0004


@pytest.fixture
def broker() -> Iterator[str]:
    with LocalBroker() as local:
        yield local.bootstrap_servers


def router_env(bootstrap: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "KAFKA_PARTITIONS": "4",
        "KAFKA_SESSION_TIMEOUT_SECONDS": "6",
        "ROUTER_MODE": "budget",
        "ROUTER_BUDGET_PER_QUERY_USD": str(BUDGET_PER_QUERY),
        "ROUTER_WINDOW_SECONDS": "1",
        "ROUTER_PREDICT_BATCH": "16",
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "METRICS_PORT": "0",
    }


def test_three_routers_killed_and_joined_mid_stream_route_each_query_once(
    broker: str, postgres_url: str, tmp_path: Path, router_embedder: Embedder
) -> None:
    settings = Settings(kafka_partitions=4)
    names = settings.topic_names()
    routes = [names[f"route:{m}"] for m in settings.router_models]
    sample = seeded_router_services(broker, postgres_url, settings, router_embedder)
    queries = [
        QueryEvent(query_id=f"scale-{i}", text=sample.prompts[40 + i % 500][-300:])
        for i in range(QUERIES)
    ]
    env = router_env(broker, postgres_url)
    logs = [tmp_path / f"router-{n}.log" for n in range(4)]
    routers: list[subprocess.Popen[bytes]] = [
        start_worker("router", env, logs[n]) for n in range(3)
    ]

    def routed() -> int:
        for router, log in zip(routers, logs, strict=False):
            code = router.poll()
            assert code in (None, -signal.SIGKILL), log.read_text(errors="replace")[-3000:]
        return len(decisions(broker, routes))

    try:
        wait_until(
            lambda: asyncio.run(group_state(broker, ROUTER_APP_ID)) == ("Stable", 3),
            180,
            "three routers in a stable group",
        )  # so the kills below come while windows are being routed, not before
        producer = produce_in_background(broker, names["queries"], queries, RATE)
        moments = []
        wait_until(lambda: routed() >= QUERIES // 5, 180, "a fifth routed by three routers")
        routers[0].kill()  # SIGKILL mid-stream
        moments.append(("killed router 0", routed()))
        wait_until(lambda: routed() >= QUERIES * 2 // 5, 180, "two fifths routed by two")
        routers.append(start_worker("router", env, logs[3]))  # one joins mid-stream
        moments.append(("started router 3", routed()))
        wait_until(lambda: routed() >= QUERIES * 3 // 5, 180, "three fifths routed")
        routers[1].kill()
        moments.append(("killed router 1", routed()))
        producer.join(timeout=120)
        wait_until(lambda: routed() >= QUERIES, 240, "every query routed")
        final = decisions(broker, routes)
        reports = [
            WindowReport.model_validate_json(v)
            for v in asyncio.run(read_topic(broker, names["windows"]))
        ]
    finally:
        for router in routers:
            if router.poll() is None:
                router.terminate()
        for router in routers:
            try:
                router.wait(timeout=60)
            except subprocess.TimeoutExpired:  # fails the test, but leaves no router behind
                router.kill()
                raise

    produced = {q.query_id for q in queries}
    messages = sum(len(v) for v in final.values())
    twice = {q: {m for m, _ in d} for q, d in final.items() if len({m for m, _ in d}) > 1}
    over_budget = [
        r.window_id
        for r in reports
        if r.window_budget_usd is not None
        and r.predicted_spend_usd > r.window_budget_usd + 1e-9
        and r.solver_status != "infeasible_budget_cheapest_plan"
    ]
    print(
        f"3 routers + 1 joined, 2 killed: produced {len(produced)}, moments {moments}, "
        f"assigned {len(final)}, assignment messages {messages}, "
        f"identical re-sends {messages - len(final)}, lost {len(produced - set(final))}, "
        f"decided twice {len(twice)}, windows {len(reports)} planning "
        f"{sum(r.query_count for r in reports)} queries, over budget {len(over_budget)}"
    )
    assert set(final) == produced  # nothing lost, nothing invented
    assert not twice, twice  # one decision per query: a re-send repeats it unchanged
    assert not over_budget, over_budget
