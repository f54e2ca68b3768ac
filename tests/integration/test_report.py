"""`omnirouter report`: its figures are the sums and means of the rows it read."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

from schemas import Outcome
from workers.cli import main
from workers.db.repository import upsert_outcomes
from workers.report import parse_duration, read_facts, summarise

pytestmark = pytest.mark.integration

OUTCOMES = [
    Outcome(query_id="q1", model="cheap", pool="default", quality_score=1.0, cost_usd=0.001),
    Outcome(query_id="q2", model="cheap", pool="default", quality_score=0.0, cost_usd=0.002),
    Outcome(query_id="q3", model="dear", pool="default", quality_score=1.0, cost_usd=0.030),
    Outcome(query_id="q4", model="dear", pool="gold", cost_usd=0.040, error="timeout"),
    Outcome(query_id="q5", model="dear", pool="gold", quality_score=0.5, cost_usd=0.050),
]


def store(engine: sa.Engine, outcomes: list[Outcome]) -> None:
    with Session(engine) as session, session.begin():
        upsert_outcomes(session, outcomes, [None] * len(outcomes))


def test_figures_per_pool_and_model_match_the_rows(postgres_engine: sa.Engine) -> None:
    store(postgres_engine, OUTCOMES)
    old = Outcome(query_id="old", model="cheap", pool="default", quality_score=0.0, cost_usd=9.0)
    store(postgres_engine, [old])
    with postgres_engine.begin() as connection:  # two days ago: outside --since 1d
        connection.execute(
            sa.text(
                "UPDATE outcomes SET created_at = now() - interval '2 days' WHERE query_id = 'old'"
            )
        )

    figures = {
        (f.pool, f.model): f for f in summarise(read_facts(postgres_engine, timedelta(days=1)))
    }

    assert set(figures) == {
        ("default", "cheap"), ("default", "dear"), ("default", "(all)"),
        ("gold", "dear"), ("gold", "(all)"),
    }  # fmt: skip
    cheap = figures[("default", "cheap")]
    assert (cheap.outcomes, cheap.scored, cheap.errors) == (2, 2, 0)
    assert cheap.spend_usd == pytest.approx(0.003) and cheap.mean_quality == pytest.approx(0.5)
    default = figures[("default", "(all)")]
    assert default.outcomes == 3 and default.spend_usd == pytest.approx(0.033)
    assert default.mean_quality == pytest.approx(2 / 3)
    gold = figures[("gold", "dear")]
    assert (gold.outcomes, gold.scored, gold.errors) == (2, 1, 1)
    assert gold.spend_usd == pytest.approx(0.090) and gold.mean_quality == pytest.approx(0.5)


def test_the_command_prints_the_table_and_writes_the_plot(
    postgres_url: str, postgres_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store(postgres_engine, OUTCOMES)
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    png = tmp_path / "report.png"
    result = CliRunner().invoke(main, ["report", "--since", "1h", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "outcomes stored in the last 1h: 5" in result.output
    gold_total = next(
        line for line in result.output.splitlines() if line.startswith("gold  ") and "(all)" in line
    )
    assert gold_total.split()[2:] == ["2", "1", "1", "0.090000", "0.5000"]
    assert png.stat().st_size > 10_000  # a real image, not an empty file
    bad = CliRunner().invoke(main, ["report", "--since", "yesterday"])
    assert bad.exit_code != 0 and "not a duration" in bad.output


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("6h", 21600), ("2d", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds
