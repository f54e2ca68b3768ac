"""Budgets kept on realised spend, on a real broker and PostgreSQL: model workers whose
answers cost twice what the router predicts (a replay table with doubled costs,
against a store seeded with the recorded ones) overspend a budget pool; with
ROUTER_SPEND_CORRECTION the pool's later windows give up budget to repay it, and
the run's realised spend ends far closer to its nominal budget than without."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas import QueryEvent, WindowReport
from tests.faults import produce_in_background, wait_until
from workers.config import ROUTER_APP_ID, Settings
from workers.db.models import OutcomeRow
from workers.demo import workers
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import Embedder
from workers.routing.windows import REPAY_SHARE
from workers.services import LocalBroker
from workers.stream.kafka_io import group_state, read_topic
from workers.stream.replay import seed_outcomes
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

# A cheap and a dear model, and a budget between them: the plan spends it.
MODELS = ["mistralai/mistral-7b-chat", "gpt-4-1106-preview"]
BUDGET_PER_QUERY_USD = 0.002
POOLS = {
    pool: {"mode": "budget", "budget_per_query_usd": BUDGET_PER_QUERY_USD, "models": MODELS}
    for pool in ("corrected", "uncorrected")
}
SEEDED = 300  # prompts whose recorded outcomes the store starts from
QUERIES = 100  # per run, of later prompts
RATE = 10.0  # queries per second: 10 s of one-second windows


@pytest.fixture
def broker() -> Iterator[str]:
    with LocalBroker() as local:
        yield local.bootstrap_servers


def doubled_costs(path: Path) -> Path:
    """The shipped sample with every recorded cost doubled: what the replay model
    worker reports, against the recorded costs the router's store holds."""
    with shipped_sample_path().open(encoding="utf-8") as source, path.open("w") as out:
        for line in source:
            if not line.strip():
                continue
            row = json.loads(line)
            for outcome in row["outcomes"].values():
                if outcome.get("cost") is not None:
                    outcome["cost"] *= 2
            out.write(json.dumps(row) + "\n")
    return path


def realised_usd(engine: sa.Engine, prefix: str) -> tuple[int, float]:
    """The run's stored outcomes with a cost, and what they cost."""
    with Session(engine) as session:
        rows = session.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(OutcomeRow.cost_usd), 0.0))
            .where(OutcomeRow.query_id.like(f"{prefix}-%"))
            .where(OutcomeRow.cost_usd.is_not(None))
        ).one()
    return int(rows[0]), float(rows[1])


def pool_reports(bootstrap: str, topic: str, pool: str) -> list[WindowReport]:
    reports = [
        WindowReport.model_validate_json(r) for r in asyncio.run(read_topic(bootstrap, topic))
    ]
    return sorted((r for r in reports if r.pool == pool), key=lambda r: r.window_start)


def run(
    bootstrap: str, database_url: str, logs: Path, replay: Path, pool: str, correction: bool,
    queries: list[QueryEvent],
) -> tuple[list[WindowReport], float]:  # fmt: skip
    """Route the queries (in `pool`) with the correction on or off; the pool's window
    reports and the realised spend of their answers."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "KAFKA_PARTITIONS": "2",
        "ROUTER_POOLS": json.dumps(POOLS),
        "ROUTER_SPEND_CORRECTION": str(correction).lower(),
        "ROUTER_EXPLORATION_SHARE": "0",  # answers only: predicted = the plans' spend
        "ROUTER_SHADOW_SHARE": "0",
        "ROUTER_WINDOW_SECONDS": "1",
        "ROUTER_STORE_REFRESH_SECONDS": "1",
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "REPLAY_DATA_PATH": str(replay),
        "REPLAY_LATENCY_MS": "10",
    }
    names = Settings(kafka_partitions=2).topic_names()
    engine = sa.create_engine(database_url)
    prefix = queries[0].query_id.rsplit("-", 1)[0]
    with workers(env, logs) as processes:
        wait_until(
            lambda: asyncio.run(group_state(bootstrap, ROUTER_APP_ID)) == ("Stable", 1),
            90,
            "the router in its group",
        )
        producer = produce_in_background(bootstrap, names["queries"], queries, RATE)
        wait_until(
            lambda: realised_usd(engine, prefix)[0] == len(queries), 90, "every answer's cost"
        )
        producer.join(timeout=10)
        assert all(p.poll() is None for p in processes), "a worker died"
    reports = pool_reports(bootstrap, names["windows"], pool)
    assert sum(r.query_count for r in reports) == len(queries)
    return reports, realised_usd(engine, prefix)[1]


def test_realised_overspend_is_taken_off_later_budgets(
    broker: str, postgres_url: str, tmp_path: Path, router_embedder: Embedder
) -> None:
    settings = Settings(kafka_partitions=2)
    asyncio.run(create_topics(settings, broker))
    sample = load_routerbench(shipped_sample_path())
    seed_outcomes(sa.create_engine(postgres_url), sample.take(list(range(SEEDED))), router_embedder)
    replay = doubled_costs(tmp_path / "doubled.jsonl")
    tag = uuid.uuid4().hex[:6]

    def queries(pool: str, first: int) -> list[QueryEvent]:
        texts = sample.prompts[first : first + QUERIES]
        return [
            QueryEvent(query_id=f"{pool}{tag}-{i}", text=text, pool=pool)
            for i, text in enumerate(texts)
        ]

    # Corrected first: the run after it predicts from a store that has learnt from its
    # answers' doubled costs, so it overspends less, which only makes this harder.
    on, on_usd = run(
        broker, postgres_url, tmp_path / "on", replay, "corrected", True,
        queries("corrected", SEEDED),
    )  # fmt: skip
    off, off_usd = run(
        broker, postgres_url, tmp_path / "off", replay, "uncorrected", False,
        queries("uncorrected", SEEDED + QUERIES),
    )  # fmt: skip

    def nominal(reports: list[WindowReport]) -> float:
        return sum((r.window_budget_usd or 0.0) + r.spend_correction_usd for r in reports)

    for report in on:
        print(
            f"corrected window: {report.query_count} queries, nominal "
            f"${BUDGET_PER_QUERY_USD * report.query_count:.4f}, correction "
            f"${report.spend_correction_usd:.4f}, predicted ${report.predicted_spend_usd:.4f}"
        )
    on_ratio, off_ratio = on_usd / nominal(on), off_usd / nominal(off)
    print(
        f"realised / nominal budget: corrected ${on_usd:.4f} / ${nominal(on):.4f} = "
        f"{on_ratio:.2f}, uncorrected ${off_usd:.4f} / ${nominal(off):.4f} = {off_ratio:.2f}"
    )
    # Each window's nominal budget is the pool's, corrected or not.
    for report in [*on, *off]:
        assert (report.window_budget_usd or 0.0) + report.spend_correction_usd == pytest.approx(
            BUDGET_PER_QUERY_USD * report.query_count
        )
    # Uncorrected, the set-up overspends; no window gives anything up.
    assert all(r.spend_correction_usd == 0.0 for r in off)
    assert off_ratio > 1.3
    # Corrected: once the first windows' answers are stored, later windows repay it
    # (at most half of each window's budget), and the run ends much closer to budget.
    corrected = [r for r in on if r.spend_correction_usd > 0]
    assert len(corrected) >= len(on) // 2, [r.spend_correction_usd for r in on]
    assert on[0].spend_correction_usd == 0.0  # nothing was known yet
    for report in corrected:
        assert report.spend_correction_usd <= REPAY_SHARE * nominal([report]) + 1e-12
    assert on_ratio < off_ratio - 0.25
