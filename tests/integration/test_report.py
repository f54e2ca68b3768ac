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
from workers.report import parse_duration, read_facts, summarise, summarise_sources

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
    assert "scored outcomes by source, and the judge's spend" in result.output
    sources = result.output.split("scored outcomes by source")[1].splitlines()
    assert sources[1].split() == ["pool", "user", "replay", "judge", "judge", "$"]
    (everything,) = [line.split() for line in sources if line.startswith("(all)")]
    assert everything == ["(all)", "4", "0", "0", "0.000000"]
    assert png.stat().st_size > 10_000  # a real image, not an empty file
    bad = CliRunner().invoke(main, ["report", "--since", "yesterday"])
    assert bad.exit_code != 0 and "not a duration" in bad.output


JUDGED = [
    Outcome(query_id="j1", model="cheap", pool="default", cost_usd=0.001, text="one"),
    Outcome(query_id="j1", model="cheap", source="judge", quality_score=0.7, judge_cost_usd=0.004),
    Outcome(query_id="j2", model="dear", pool="gold", cost_usd=0.01, text="two"),
    Outcome(query_id="j2", model="dear", source="judge", judge_cost_usd=0.003),  # no score read
    Outcome(query_id="j3", model="dear", pool="gold", quality_score=1.0, source="replay"),
    # A judge's score, then the user's for the same answer: the user's stays.
    Outcome(query_id="j4", model="cheap", pool="gold", text="four"),
    Outcome(query_id="j4", model="cheap", source="judge", quality_score=0.2, judge_cost_usd=0.002),
    Outcome(query_id="j4", model="cheap", source="user", quality_score=1.0),
]


def test_scores_by_source_and_the_judge_s_spend(postgres_engine: sa.Engine) -> None:
    store(postgres_engine, OUTCOMES)
    for outcome in JUDGED:  # one event at a time, as the outcome writer's batches may be
        store(postgres_engine, [outcome])

    facts = read_facts(postgres_engine, timedelta(hours=1))
    sources = {f.pool: f for f in summarise_sources(facts)}

    assert list(sources) == ["default", "gold", "(all)"]
    # OUTCOMES' scores carry no source: the user's.
    assert sources["default"].scored == {"user": 3, "replay": 0, "judge": 1}
    assert sources["default"].judge_spend_usd == pytest.approx(0.004)
    assert sources["gold"].scored == {"user": 2, "replay": 1, "judge": 0}
    assert sources["gold"].judge_spend_usd == pytest.approx(0.003 + 0.002)
    assert sources["(all)"].scored == {"user": 5, "replay": 1, "judge": 1}
    assert sources["(all)"].judge_spend_usd == pytest.approx(0.009)
    # The judge's spend is not the models' spend.
    figures = {(f.pool, f.model): f for f in summarise(facts)}
    assert figures[("default", "cheap")].spend_usd == pytest.approx(0.003 + 0.001)
    assert figures[("gold", "cheap")].mean_quality == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("6h", 21600), ("2d", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_a_period_holds_the_answers_given_in_it_whenever_their_scores_came(
    postgres_engine: sa.Engine,
) -> None:
    """A score arrives after its answer (a judge, a user's feedback days later) and
    updates the row. The answer's spend and quality belong to the period it was
    given in: a late score must not pull an old answer's spend into today's figures,
    and an answer given today counts today, with the score it has by now."""
    given_earlier = Outcome(query_id="earlier", model="dear", cost_usd=5.0, text="earlier")
    given_today = Outcome(query_id="today", model="dear", cost_usd=0.02, text="today")
    store(postgres_engine, [given_earlier, given_today])
    with postgres_engine.begin() as connection:  # answered two days ago
        connection.execute(
            sa.text(
                "UPDATE outcomes SET created_at = now() - interval '2 days', "
                "updated_at = now() - interval '2 days' WHERE query_id = 'earlier'"
            )
        )
    for query_id, score in (("earlier", 0.0), ("today", 1.0)):  # both scored now
        late = Outcome(
            query_id=query_id, model="dear", source="judge", quality_score=score,
            judge_cost_usd=0.001,
        )  # fmt: skip
        store(postgres_engine, [late])

    facts = read_facts(postgres_engine, timedelta(days=1))

    assert [f.model for f in facts] == ["dear"]
    (figures,) = [f for f in summarise(facts) if f.model == "dear"]
    assert (figures.outcomes, figures.scored) == (1, 1)
    assert figures.spend_usd == pytest.approx(0.02) and figures.mean_quality == pytest.approx(1.0)
    (everything,) = [s for s in summarise_sources(facts) if s.pool == "(all)"]
    assert everything.judge_spend_usd == pytest.approx(0.001)
    # Two days back, the earlier answer is there with its late score and the judge's cost.
    longer = summarise(read_facts(postgres_engine, timedelta(days=3)))
    (both,) = [f for f in longer if f.model == "dear"]
    assert (both.outcomes, both.spend_usd, both.mean_quality) == (2, pytest.approx(5.02), 0.5)
