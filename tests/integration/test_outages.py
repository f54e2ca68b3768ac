"""The broker or the database goes away for a while and comes back.

A TCP proxy on loopback (tests/faults.py) sits between the workers and the
service; the test cuts it for OUTAGE_SECONDS and restores it. The workers must
reconnect by themselves, and every query and outcome must be accounted for,
counted over everything published or stored.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from schemas import Outcome, QueryEvent, WindowReport
from tests.faults import (
    DecisionCount,
    TcpProxy,
    caught_up,
    decisions,
    lag,
    poll_until,
    seeded_router_services,
    start_worker,
    wait_until,
)
from workers.config import ROUTER_APP_ID, Settings
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import Embedder
from workers.services import LocalBroker, PersistentLocalBroker
from workers.stream.codec import encode
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.outcomes import OUTCOMES_APP_ID
from workers.stream.replay import produce_queries
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

MAX_WINDOW_QUERIES = 40
OUTAGE_SECONDS = 15  # longer than the Kafka session timeout (10 s): the group must rejoin
SETTINGS = Settings(kafka_partitions=2)
NAMES = SETTINGS.topic_names()
ROUTES = [NAMES[f"route:{m}"] for m in SETTINGS.router_models]
READ_BY_ROUTER = [NAMES["queries"], NAMES["predicted"]]


def worker_env(bootstrap: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "KAFKA_PARTITIONS": "2",
        "ROUTER_WINDOW_SECONDS": "0.5",
        "ROUTER_MAX_WINDOW_QUERIES": str(MAX_WINDOW_QUERIES),
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "ROUTER_STORE_REFRESH_SECONDS": "1",
    }


def queries(prefix: str, count: int) -> list[QueryEvent]:
    sample = load_routerbench(shipped_sample_path())
    return [
        QueryEvent(query_id=f"{prefix}-{i}", text=sample.prompts[40 + i][-300:])
        for i in range(count)
    ]


def assert_each_routed_once(bootstrap: str, produced: set[str]) -> str:
    published = decisions(bootstrap, ROUTES)
    messages = sum(len(v) for v in published.values())
    assert set(published) == produced, f"lost {sorted(produced - set(published))[:10]}"
    doubled = {q: set(d) for q, d in published.items() if len(set(d)) > 1}
    assert not doubled, doubled
    return (
        f"produced {len(produced)}, assigned {len(published)}, messages {messages}, "
        f"identical re-sends {messages - len(published)}, lost 0, decided twice 0"
    )


@pytest.fixture
def proxied_broker() -> Iterator[tuple[LocalBroker, TcpProxy]]:
    """A broker whose advertised address is a proxy, so every client goes through it."""
    proxy = TcpProxy(target_port=0)
    broker = LocalBroker(advertised_port=proxy.port)
    proxy.target_port = broker.port
    with broker, proxy.running():
        yield broker, proxy


def test_the_router_rides_out_a_broker_outage(
    proxied_broker: tuple[LocalBroker, TcpProxy],
    postgres_url: str,
    tmp_path: Path,
    router_embedder: Embedder,
) -> None:
    _, proxy = proxied_broker
    bootstrap = proxy.address
    seeded_router_services(bootstrap, postgres_url, SETTINGS, router_embedder)
    before, after = queries("before", 150), queries("after", 150)
    log = tmp_path / "router.log"
    router = start_worker("router", worker_env(bootstrap, postgres_url), log)
    try:
        asyncio.run(produce_queries(bootstrap, NAMES["queries"], before, 0))
        wait_until(lambda: len(decisions(bootstrap, ROUTES)) >= 50, 120, "routing started")
        proxy.cut()  # mid-stream: windows open, assignments in flight
        time.sleep(OUTAGE_SECONDS)
        assert router.poll() is None, "the router died during the outage"
        proxy.restore()
        asyncio.run(produce_queries(bootstrap, NAMES["queries"], after, 0))
        produced = {q.query_id for q in before + after}
        wait_until(
            lambda: len(decisions(bootstrap, ROUTES)) >= len(produced),
            180,
            f"every query routed after the outage (router log {log})",
        )
        wait_until(  # nothing the router reads is left: anything still to come is not
            lambda: caught_up(bootstrap, ROUTER_APP_ID, READ_BY_ROUTER), 30, "router caught up"
        )
        print(f"broker outage of {OUTAGE_SECONDS}s: {assert_each_routed_once(bootstrap, produced)}")
        reports = [
            WindowReport.model_validate_json(raw)
            for raw in asyncio.run(read_topic(bootstrap, NAMES["windows"]))
        ]
        assert max(r.query_count for r in reports) <= MAX_WINDOW_QUERIES  # the limit holds
        assert router.poll() is None
    finally:
        router.terminate()
        router.wait(timeout=30)


RESTART_COMMAND = os.environ.get("OMNIROUTER_TEST_BROKER_RESTART_COMMAND", "")


@pytest.fixture
def restartable_broker(request: pytest.FixtureRequest) -> tuple[str, Callable[[], object]]:
    """(bootstrap servers, restart) of a broker that keeps its data: your own cluster and
    its restart command when OMNIROUTER_TEST_BROKER_RESTART_COMMAND is set, else the
    persistent local broker (noida-db), restarted with SIGTERM on the same port and data."""
    if RESTART_COMMAND:
        configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not configured:
            pytest.fail("OMNIROUTER_TEST_BROKER_RESTART_COMMAND needs KAFKA_BOOTSTRAP_SERVERS")
        return configured, lambda: subprocess.run(RESTART_COMMAND, shell=True, check=True)
    broker: PersistentLocalBroker = request.getfixturevalue("persistent_broker")
    return broker.bootstrap_servers, broker.restart


def test_the_router_rides_out_a_broker_restart(
    restartable_broker: tuple[str, Callable[[], object]], postgres_url: str, tmp_path: Path
) -> None:
    bootstrap, restart = restartable_broker
    asyncio.run(create_topics(SETTINGS, bootstrap))
    run = f"restart-{uuid.uuid4().hex[:6]}"  # your broker may hold earlier runs' queries
    before, after = queries(f"{run}-before", 150), queries(f"{run}-after", 150)
    produced = {q.query_id for q in before + after}

    def routed(query_ids: set[str]) -> set[str]:
        return set(decisions(bootstrap, ROUTES)) & query_ids

    log = tmp_path / "router.log"
    router = start_worker("router", worker_env(bootstrap, postgres_url), log)
    try:
        asyncio.run(produce_queries(bootstrap, NAMES["queries"], before, 0))
        wait_until(lambda: len(routed(produced)) >= 50, 120, "routing started")
        routed_before = routed(produced)
        restart()  # mid-stream: windows open, assignments in flight
        assert routed(produced) >= routed_before, "the broker lost decisions in its restart"
        asyncio.run(produce_queries(bootstrap, NAMES["queries"], after, 0))
        poll_until(lambda: routed(produced) == produced, 90)
        settled = poll_until(lambda: caught_up(bootstrap, ROUTER_APP_ID, READ_BY_ROUTER), 30)
        count = DecisionCount.of(decisions(bootstrap, ROUTES), produced)
        after_routed = routed({q.query_id for q in after})
        print(
            f"broker restart: routed before it {len(routed_before)} (all kept by the broker), "
            f"{count}; produced after it and routed {len(after_routed)} of {len(after)}"
        )
        assert not count.lost, f"lost {sorted(count.lost)[:10]} (router log {log})"
        assert not count.decided_twice, count.decided_twice
        left = asyncio.run(lag(bootstrap, ROUTER_APP_ID, READ_BY_ROUTER))
        assert settled, f"records the router never committed: {left}"
        assert router.poll() is None
    finally:
        router.terminate()
        router.wait(timeout=30)


def outcome_events(prefix: str, count: int) -> list[tuple[str, bytes]]:
    models = SETTINGS.router_models
    return [
        (
            f"{prefix}-{i}",
            encode(
                Outcome(
                    query_id=f"{prefix}-{i}",
                    model=models[i % len(models)],
                    quality_score=float(i % 2),
                    cost_usd=0.001,
                    text=f"question {i} of {prefix}",
                )
            ),
        )
        for i in range(count)
    ]


def stored_outcomes(engine: sa.Engine) -> tuple[int, int]:
    """(rows, distinct (query_id, model) pairs) in the outcomes table."""
    with engine.connect() as connection:
        rows, pairs = connection.execute(
            sa.text("SELECT count(*), count(DISTINCT (query_id, model)) FROM outcomes")
        ).one()
    return int(rows), int(pairs)


def test_outcomes_wait_out_a_database_outage_while_routing_goes_on(
    postgres_url: str, tmp_path: Path
) -> None:
    direct = sa.create_engine(postgres_url)  # the test's own view, never cut
    with LocalBroker() as broker, TcpProxy(make_url(postgres_url).port or 5432).running() as proxy:
        bootstrap = broker.bootstrap_servers
        proxied_url = make_url(postgres_url).set(port=proxy.port).render_as_string(False)
        asyncio.run(create_topics(SETTINGS, bootstrap))
        env = worker_env(bootstrap, proxied_url)
        writer = start_worker("outcomes", env, tmp_path / "outcomes.log")
        router = start_worker("router", env, tmp_path / "router.log")
        try:
            first, second = outcome_events("first", 100), outcome_events("second", 100)
            asyncio.run(produce_values(bootstrap, NAMES["outcomes"], first))
            wait_until(lambda: stored_outcomes(direct)[0] == 100, 120, "first outcomes stored")

            proxy.cut()
            cut_at = time.monotonic()
            asyncio.run(produce_values(bootstrap, NAMES["outcomes"], second))
            during = queries("during", 60)
            asyncio.run(produce_queries(bootstrap, NAMES["queries"], during, 0))
            wait_until(
                lambda: len(decisions(bootstrap, ROUTES)) >= len(during),
                60,
                "routing while the database is down",
            )
            routed_during = assert_each_routed_once(bootstrap, {q.query_id for q in during})
            assert stored_outcomes(direct) == (100, 100)  # nothing written, nothing faked
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
            assert writer.poll() is None and router.poll() is None
            proxy.restore()

            wait_until(lambda: stored_outcomes(direct)[0] >= 200, 120, "outcomes written later")
            wait_until(  # every outcome event handled: a row still to come is not
                lambda: caught_up(bootstrap, OUTCOMES_APP_ID, [NAMES["outcomes"]]),
                30,
                "outcome writer caught up",
            )
            rows, pairs = stored_outcomes(direct)
            assert (rows, pairs) == (200, 200)
            print(
                f"database outage of {OUTAGE_SECONDS}s: outcomes produced 200, stored {rows}, "
                f"distinct {pairs}; queries routed during the outage: {routed_during}"
            )
        finally:
            for process in (writer, router):
                process.terminate()
                process.wait(timeout=30)


def test_postgres_tls_settings_in_the_url_reach_the_driver(postgres_url: str) -> None:
    """sslmode is passed to libpq untouched: this server has no TLS, so `require` fails
    with the server's own answer, and `disable` connects."""
    url = make_url(postgres_url)
    with sa.create_engine(url.update_query_dict({"sslmode": "disable"})).connect() as connection:
        assert connection.execute(sa.text("SELECT 1")).scalar() == 1
    with pytest.raises(sa.exc.OperationalError, match="SSL"):
        sa.create_engine(url.update_query_dict({"sslmode": "require"})).connect()


def test_a_retried_batch_written_after_a_rebalance_does_not_put_an_older_score_back(
    postgres_url: str, tmp_path: Path
) -> None:
    """Writer A holds a user's first score while its database is down, and stalls (a
    pause, SIGSTOP here) long enough to leave the group; writer B takes the partition,
    re-reads and stores the first score, then the user's second. When A goes on with
    its database back, its retry lands last: the second score must still stand."""
    direct = sa.create_engine(postgres_url)
    settings = Settings(kafka_partitions=1)  # type: ignore[call-arg]  # one owner at a time
    with LocalBroker() as broker, TcpProxy(make_url(postgres_url).port or 5432).running() as proxy:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        env = worker_env(bootstrap, postgres_url) | {"KAFKA_PARTITIONS": "1", "METRICS_PORT": "0"}
        proxied_url = make_url(postgres_url).set(port=proxy.port).render_as_string(False)
        log_a, log_b = tmp_path / "writer-a.log", tmp_path / "writer-b.log"
        writer_a = start_worker("outcomes", env | {"DATABASE_URL": proxied_url}, log_a)
        writers = [writer_a]
        model = SETTINGS.router_models[0]

        def send(outcome: Outcome) -> None:
            asyncio.run(produce_values(bootstrap, NAMES["outcomes"], [("q", encode(outcome))]))

        def score() -> float | None:
            with direct.connect() as connection:
                return connection.execute(
                    sa.text("SELECT quality_score FROM outcomes WHERE query_id = 'q'")
                ).scalar_one_or_none()

        def score_is(value: float) -> Callable[[], bool]:
            return lambda: score() == value

        try:
            send(Outcome(query_id="q", model=model, text="Is 7 prime?", cost_usd=0.001))
            wait_until(lambda: stored_outcomes(direct)[0] == 1, 120, "the usage stored by A")
            proxy.cut()
            send(Outcome(query_id="q", model=model, quality_score=0.2, source="user"))
            wait_until(
                lambda: "database unavailable" in log_a.read_text(), 30, "A retrying the score"
            )
            writer_a.send_signal(signal.SIGSTOP)  # no heartbeats: A leaves the group
            writers.append(start_worker("outcomes", env, log_b))  # B: its database is up
            wait_until(score_is(0.2), 120, "B, the partition's new owner, storing the score")
            send(Outcome(query_id="q", model=model, quality_score=0.9, source="user"))
            wait_until(score_is(0.9), 30, "B storing the user's second score")
            proxy.restore()
            writer_a.send_signal(signal.SIGCONT)
            wait_until(
                lambda: "outcomes after" in log_a.read_text(), 90, "A's retry written at last"
            )
            assert score() == 0.9
        finally:
            writer_a.send_signal(signal.SIGCONT)
            for process in writers:
                process.terminate()
            for process in writers:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:  # stuck: never left running
                    process.kill()
                    process.wait()
            direct.dispose()
