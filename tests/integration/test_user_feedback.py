"""A user's feedback through the real outcome writer: it outranks a judge's score,
whichever comes first, in separate batches or in one. And the writer's metrics
count an outcome read again once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from schemas import DeadLetter, Outcome
from workers.config import Settings
from workers.db.models import OutcomeRow
from workers.services import LocalBroker, free_port
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

MODEL, OTHER_MODEL = "gpt-4-1106-preview", "claude-v2"


@pytest.fixture
def broker() -> Iterator[str]:
    with LocalBroker() as local:
        yield local.bootstrap_servers


@contextmanager
def running_outcome_writer(
    broker: str, postgres_url: str, tmp_path: Path, metrics_port: int = 0
) -> Iterator[str]:
    """`omnirouter outcomes` as a process of its own; yields the outcomes topic."""
    settings = Settings(kafka_partitions=2)  # type: ignore[call-arg]
    asyncio.run(create_topics(settings, broker))
    env = {
        **os.environ,
        "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "DATABASE_URL": postgres_url,
        "KAFKA_PARTITIONS": "2",
        "METRICS_PORT": str(metrics_port),
    }
    env.pop("ROUTER_MODELS", None)
    log_path = tmp_path / "outcomes.log"
    with open(log_path, "wb") as log:
        writer = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "outcomes", "--loglevel", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield settings.topic_names()["outcomes"]
        finally:
            writer.send_signal(signal.SIGTERM)
            try:
                writer.wait(timeout=20)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
    print(log_path.read_text()[-2000:])


@pytest.fixture
def outcome_writer(broker: str, postgres_url: str, tmp_path: Path) -> Iterator[str]:
    with running_outcome_writer(broker, postgres_url, tmp_path) as topic:
        yield topic


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def stored(engine: sa.Engine, query_id: str) -> dict[str, OutcomeRow]:
    with Session(engine) as session:
        query = sa.select(OutcomeRow).where(OutcomeRow.query_id == query_id)
        return {row.model: row for row in session.scalars(query)}


def user_feedback(query_id: str, score: float) -> str:
    """What an application sends for a query its user rated (as in the README)."""
    return json.dumps(
        {
            "schema_version": 2,
            "query_id": query_id,
            "model": MODEL,
            "quality_score": score,
            "source": "user",
        }
    )


def events(query_id: str) -> list[str]:
    """Usage with the text, a judge's score, the user's, another judge's."""
    usage = Outcome(query_id=query_id, model=MODEL, text="Is 7 prime?", cost_usd=0.003)
    judge = Outcome(query_id=query_id, model=MODEL, quality_score=0.2, source="judge")
    late_judge = judge.model_copy(update={"quality_score": 0.4})
    return [
        usage.model_dump_json(),
        judge.model_dump_json(),
        user_feedback(query_id, 1.0),
        late_judge.model_dump_json(),
    ]


def sentinel(query_id: str) -> str:
    """Behind the others on their partition (same key): once stored, they are too."""
    return Outcome(query_id=query_id, model=OTHER_MODEL, text="Is 7 prime?").model_dump_json()


def test_a_users_score_outranks_a_judges_before_and_after_it(
    broker: str, postgres_url: str, outcome_writer: str
) -> None:
    engine = sa.create_engine(postgres_url)

    def send(query_id: str, *values: str) -> None:
        asyncio.run(produce_values(broker, outcome_writer, [(query_id, v) for v in values]))

    def source_of(query_id: str) -> str | None:
        row = stored(engine, query_id).get(MODEL)
        return None if row is None else (row.score_source or "unscored")

    # One event at a time, each stored before the next is sent: separate batches.
    usage, judge, user, late_judge = events("fb-1")
    started = time.monotonic()
    send("fb-1", usage)
    wait_for(lambda: source_of("fb-1") == "unscored", 120, "the usage")  # model load
    print(f"outcome writer stored its first outcome after {time.monotonic() - started:.1f}s")
    send("fb-1", judge)
    wait_for(lambda: source_of("fb-1") == "judge", 30, "the judge's score")
    send("fb-1", user)
    wait_for(lambda: source_of("fb-1") == "user", 30, "the user's score")
    send("fb-1", late_judge, sentinel("fb-1"))
    wait_for(lambda: OTHER_MODEL in stored(engine, "fb-1"), 30, "the events after the user's")

    # The same four events at once: most likely one batch, merged before the upsert.
    send("fb-2", *events("fb-2"), sentinel("fb-2"))
    wait_for(lambda: OTHER_MODEL in stored(engine, "fb-2"), 30, "the burst")

    for query_id in ("fb-1", "fb-2"):
        row = stored(engine, query_id)[MODEL]
        assert (row.quality_score, row.score_source) == (1.0, "user"), query_id
        assert row.cost_usd == pytest.approx(0.003)
        assert row.embedding is not None and len(row.embedding) == 256 * 4  # static embedder
    engine.dispose()


def test_feedback_naming_a_model_that_never_answered_is_a_dead_letter(
    broker: str, postgres_url: str, outcome_writer: str
) -> None:
    """The query is stored (MODEL answered it), but the feedback names OTHER_MODEL: no
    phantom (query_id, OTHER_MODEL) row with a score and no answer, cost or tokens."""
    engine = sa.create_engine(postgres_url)
    deadletter = Settings().topic_names()["deadletter"]  # type: ignore[call-arg]

    def send(*values: str) -> None:
        asyncio.run(produce_values(broker, outcome_writer, [("fb-3", v) for v in values]))

    usage, *_ = events("fb-3")
    send(usage)
    wait_for(lambda: MODEL in stored(engine, "fb-3"), 120, "the usage")  # model load
    phantom = json.loads(user_feedback("fb-3", 0.0)) | {"model": OTHER_MODEL}
    # Behind the phantom on its partition: once this score is stored, the phantom was read.
    send(json.dumps(phantom), user_feedback("fb-3", 0.5))
    wait_for(lambda: stored(engine, "fb-3")[MODEL].quality_score == 0.5, 30, "the later score")
    assert set(stored(engine, "fb-3")) == {MODEL}

    def reasons() -> list[str]:
        raws = asyncio.run(read_topic(broker, deadletter))
        return [DeadLetter.model_validate_json(raw).reason for raw in raws]

    wait_for(lambda: bool(reasons()), 30, "the phantom's dead letter")
    assert reasons() == [
        f"outcome for query 'fb-3' without its text names model {OTHER_MODEL!r}, "
        f"which never answered it (answered: [{MODEL!r}])"
    ]
    engine.dispose()


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(sample name, its model label or "") -> value, of the writer's /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, sample.labels.get("model", "")): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_outcomes_read_again_are_not_counted_again(
    broker: str, postgres_url: str, tmp_path: Path
) -> None:
    """The usage and the judge's score, stored; then the same records again (as a
    batch read again after a restart or a rebalance is) and a sentinel behind them.
    Before, the spend and the score were counted twice."""
    port = free_port()
    usage, judge, *_ = events("m-1")
    paid = Outcome(query_id="m-1", model=OTHER_MODEL, text="Is 7 prime?", cost_usd=0.5)
    with running_outcome_writer(broker, postgres_url, tmp_path, port) as topic:

        def send(*values: str) -> None:
            asyncio.run(produce_values(broker, topic, [("m-1", v) for v in values]))

        def counted() -> dict[tuple[str, str], float]:
            try:
                return scrape(port)
            except OSError:  # not serving yet
                return {}

        send(usage, judge)
        wait_for(
            lambda: bool(counted().get(("omnirouter_scored_outcomes_total", MODEL))),
            120,
            "the score",
        )
        send(usage, judge, paid.model_dump_json())
        spend = "omnirouter_realised_spend_usd_total"
        wait_for(lambda: (spend, OTHER_MODEL) in counted(), 30, "the sentinel counted")
        metrics = counted()
    assert metrics[(spend, MODEL)] == pytest.approx(0.003)  # before: 0.006
    assert metrics[("omnirouter_scored_outcomes_total", MODEL)] == 1  # before: 2
    assert metrics[("omnirouter_realised_quality_total", MODEL)] == pytest.approx(0.2)
    assert metrics[("omnirouter_outcomes_written_total", "")] == 3  # before: 5


def test_an_outcome_counts_only_what_its_row_keeps(
    broker: str, postgres_url: str, tmp_path: Path
) -> None:
    """A probe's error, the escalated answer (no excerpt), the user's score, then a
    judge's with its cost: the judge's cost changes the row, its score does not. All
    read again: nothing changes. Before, the judge's score was counted beside the
    user's, and on the second reading the error and the answer each changed the
    row back (their latencies), so the answer's spend was counted again."""
    port = free_port()
    created = datetime.now(UTC)  # a record read again keeps its times (within the skew)
    failed = Outcome(query_id="m-2", model=MODEL, error="HTTP 500", latency_ms=5.0, text="Q?")
    answered = Outcome(
        query_id="m-2", model=MODEL, latency_ms=100.0, cost_usd=2.0, output_tokens=9, text="Q?"
    )
    user = Outcome(
        query_id="m-2", model=MODEL, quality_score=0.9, source="user", created_at=created
    )
    judge = Outcome(
        query_id="m-2",
        model=MODEL,
        quality_score=0.3,
        source="judge",
        judge_cost_usd=1e-4,
        created_at=created,
    )
    records = [o.model_dump_json() for o in (failed, answered, user, judge)]
    paid = Outcome(query_id="m-2", model=OTHER_MODEL, text="Q?", cost_usd=0.5)
    with running_outcome_writer(broker, postgres_url, tmp_path, port) as topic:

        def send(*values: str) -> None:
            asyncio.run(produce_values(broker, topic, [("m-2", v) for v in values]))

        def counted() -> dict[tuple[str, str], float]:
            try:
                return scrape(port)
            except OSError:  # not serving yet
                return {}

        written = ("omnirouter_outcomes_written_total", "")
        send(*records)
        wait_for(lambda: counted().get(written) == 4, 120, "the four outcomes")
        send(*records, paid.model_dump_json())
        spend = "omnirouter_realised_spend_usd_total"
        wait_for(lambda: (spend, OTHER_MODEL) in counted(), 30, "the sentinel counted")
        metrics = counted()
    assert metrics[(spend, MODEL)] == pytest.approx(2.0)  # before: 4.0
    assert metrics[("omnirouter_scored_outcomes_total", MODEL)] == 1  # before: 2
    assert metrics[("omnirouter_realised_quality_total", MODEL)] == pytest.approx(0.9)
    assert metrics[written] == 5  # before: 7
    engine = sa.create_engine(postgres_url)
    row = stored(engine, "m-2")[MODEL]
    engine.dispose()
    assert (row.error, row.latency_ms, row.quality_score) == (None, 100.0, 0.9)
