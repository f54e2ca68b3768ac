"""`omnirouter report --since DURATION`: what routing cost and achieved, from PostgreSQL.

Per pool and per model: outcomes, how many carry a quality score, realised
spend and mean realised quality, errors; per pool, who gave the scores (user,
replay, judge) and what the judge's calls cost; and a PNG of spend and quality
over time. It reads the outcomes table only, so it answers for any period the
database holds, metrics server or not.

A period holds the answers given in it (the row's created_at: the model
worker's outcome is published before its answer, so it creates the row), each
with the score it has by now. A score arrives later (a judge, a user's feedback
days on) and moves the row's updated_at; reading periods by that would pull an
old answer's spend into today's figures whenever it is scored, and count the
spend of one answer in two periods' reports.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from workers.db.models import OutcomeRow

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '6h', '2d', '1w'."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use a number and s, m, h, d or w: '6h')")
    try:  # OverflowError's traceback before: a period, or its cutoff, past any date
        period = timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
        datetime.now(UTC) - period
    except OverflowError:
        raise ValueError(f"{text!r} reaches back before the year 1") from None
    return period


@dataclass(frozen=True)
class OutcomeFact:
    pool: str
    model: str
    created_at: datetime
    cost_usd: float | None
    quality_score: float | None
    error: str | None
    score_source: str | None = None  # user, replay, judge; None without a score
    judge_cost_usd: float | None = None


@dataclass(frozen=True)
class Figures:
    pool: str
    model: str  # "(all)" for a pool's total
    outcomes: int
    scored: int
    errors: int
    spend_usd: float
    mean_quality: float | None  # None when nothing was scored


@dataclass(frozen=True)
class SourceFigures:
    """Who scored a pool's outcomes, and what judging them cost."""

    pool: str  # "(all)" for every pool together
    scored: dict[str, int]  # source -> scored outcomes; a score without a source is the user's
    judge_spend_usd: float


SOURCES = ("user", "replay", "judge")


def read_facts(
    engine: sa.Engine, since: timedelta, now: datetime | None = None
) -> list[OutcomeFact]:
    cutoff = (now or datetime.now(UTC)) - since
    query = (
        sa.select(
            OutcomeRow.pool,
            OutcomeRow.model,
            OutcomeRow.created_at,
            OutcomeRow.cost_usd,
            OutcomeRow.quality_score,
            OutcomeRow.error,
            OutcomeRow.score_source,
            OutcomeRow.judge_cost_usd,
        )
        .where(OutcomeRow.created_at >= cutoff)
        .order_by(OutcomeRow.created_at)
    )
    with Session(engine) as session:
        return [OutcomeFact(*row) for row in session.execute(query)]


def summarise(facts: Sequence[OutcomeFact]) -> list[Figures]:
    """Figures per (pool, model), then each pool's total, sorted by pool and model."""
    groups: dict[tuple[str, str], list[OutcomeFact]] = defaultdict(list)
    for fact in facts:
        groups[(fact.pool, fact.model)].append(fact)
        groups[(fact.pool, "(all)")].append(fact)
    return [_figures(pool, model, members) for (pool, model), members in sorted(groups.items())]


def _figures(pool: str, model: str, facts: list[OutcomeFact]) -> Figures:
    scores = [f.quality_score for f in facts if f.quality_score is not None]
    return Figures(
        pool=pool,
        model=model,
        outcomes=len(facts),
        scored=len(scores),
        errors=sum(1 for f in facts if f.error),
        spend_usd=sum(f.cost_usd or 0.0 for f in facts),
        mean_quality=sum(scores) / len(scores) if scores else None,
    )


def summarise_sources(facts: Sequence[OutcomeFact]) -> list[SourceFigures]:
    """Scores by source and the judge's spend per pool, sorted, then "(all)"."""
    pools = sorted({f.pool for f in facts})
    per_pool = [_source_figures(pool, [f for f in facts if f.pool == pool]) for pool in pools]
    return [*per_pool, _source_figures("(all)", list(facts))]


def _source_figures(pool: str, facts: list[OutcomeFact]) -> SourceFigures:
    scored = dict.fromkeys(SOURCES, 0)
    for fact in facts:
        if fact.quality_score is not None:
            source = fact.score_source or "user"
            scored[source] = scored.get(source, 0) + 1
    spend = sum(f.judge_cost_usd or 0.0 for f in facts)
    return SourceFigures(pool=pool, scored=scored, judge_spend_usd=spend)


def format_sources(figures: Sequence[SourceFigures]) -> str:
    header = f"{'pool':<12} " + " ".join(f"{s:>7}" for s in SOURCES) + f" {'judge $':>11}"
    lines = ["scored outcomes by source, and the judge's spend", header, "-" * len(header)]
    for f in figures:
        counts = " ".join(f"{f.scored.get(s, 0):>7}" for s in SOURCES)
        lines.append(f"{f.pool:<12} {counts} {f.judge_spend_usd:>11.6f}")
    return "\n".join(lines)


def format_table(figures: Sequence[Figures]) -> str:
    header = (
        f"{'pool':<12} {'model':<40} {'outcomes':>8} {'scored':>7} {'errors':>6} "
        f"{'spend $':>11} {'quality':>8}"
    )
    lines = [header, "-" * len(header)]
    for f in figures:
        quality = "-" if f.mean_quality is None else f"{f.mean_quality:.4f}"
        lines.append(
            f"{f.pool:<12} {f.model:<40} {f.outcomes:>8} {f.scored:>7} {f.errors:>6} "
            f"{f.spend_usd:>11.6f} {quality:>8}"
        )
    return "\n".join(lines)


def plot(facts: Sequence[OutcomeFact], path: Path, buckets: int = 30) -> None:
    """Cumulative spend and mean quality per time bucket, one line per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (spend_axis, quality_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if facts:
        start, end = facts[0].created_at, facts[-1].created_at
        width = max((end - start) / buckets, timedelta(seconds=1))
        for pool in sorted({f.pool for f in facts}):
            members = [f for f in facts if f.pool == pool]
            times, spend, total = [], [], 0.0
            for fact in members:
                total += fact.cost_usd or 0.0
                times.append(fact.created_at)
                spend.append(total)
            spend_axis.plot(times, spend, label=pool)
            scores: dict[int, list[float]] = defaultdict(list)
            for fact in members:
                if fact.quality_score is not None:
                    scores[int((fact.created_at - start) / width)].append(fact.quality_score)
            bucket_times = [start + width * (b + 0.5) for b in sorted(scores)]
            means = [sum(scores[b]) / len(scores[b]) for b in sorted(scores)]
            quality_axis.plot(bucket_times, means, marker="o", label=pool)
    spend_axis.set_ylabel("cumulative spend (USD)")
    quality_axis.set_ylabel("mean realised quality")
    quality_axis.set_ylim(0, 1)
    spend_axis.legend(loc="upper left")
    figure.autofmt_xdate()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
