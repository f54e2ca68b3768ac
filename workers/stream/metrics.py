"""Prometheus metrics of every worker, served on its METRICS_PORT at /metrics.

Operators read from them whether routing saves money without losing quality:
spend predicted at routing time against the budget, then against what the
outcomes say was spent; predicted quality against realised quality per model
(calibration). Ratios are left to PromQL (sum / count), so every metric here
is a plain counter, histogram or gauge. What each one means: README, Operations.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence

import faust
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas import Assignment, DeadLetter, Outcome, WindowReport

log = logging.getLogger(__name__)

QUERIES_IN = Counter("omnirouter_queries_total", "Valid queries read by the router", ["pool"])
DEAD_LETTERS = Counter(
    "omnirouter_dead_letters_total", "Events sent to the dead-letter topic", ["topic", "reason"]
)
ASSIGNMENTS = Counter(
    "omnirouter_assignments_total", "Queries assigned (decided once each)", ["model", "pool"]
)
PREDICTED_QUALITY = Counter(
    "omnirouter_predicted_quality_total",
    "Sum of the predicted quality of assigned queries (divide by assignments)",
    ["model", "pool"],
)
WINDOW_SOLVE_SECONDS = Histogram(
    "omnirouter_window_solve_seconds",
    "Time to solve one pool's window",
    ["pool"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WINDOW_QUERIES = Histogram(
    "omnirouter_window_queries",
    "Queries in one pool's window",
    ["pool"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000),
)
WINDOWS = Counter("omnirouter_windows_total", "Windows solved", ["pool", "status"])
EXPLORATIONS = Counter(
    "omnirouter_exploration_assignments_total",
    "Queries sent to a model to learn about it (included in the assignments)",
    ["model", "pool"],
)
EXPLORATION_SPEND_USD = Counter(
    "omnirouter_exploration_spend_usd_total",
    "Predicted spend of exploratory assignments (included in the predicted spend)",
    ["pool"],
)
SHADOWS = Counter(
    "omnirouter_shadow_assignments_total",
    "Shadow answers asked: a second model's answer, judged and never delivered",
    ["model", "pool"],
)
SHADOW_SPEND_USD = Counter(
    "omnirouter_shadow_spend_usd_total",
    "Predicted spend of shadow answers (included in the predicted spend)",
    ["pool"],
)
WINDOW_BUDGET_USD = Counter(
    "omnirouter_window_budget_usd_total", "Budget of the windows solved (budget mode)", ["pool"]
)
SPEND_CORRECTION_USD = Counter(
    "omnirouter_spend_correction_usd_total",
    "Budget the windows gave up to repay realised spend over predicted (budget mode)",
    ["pool"],
)
PREDICTED_SPEND_USD = Counter(
    "omnirouter_predicted_spend_usd_total", "Spend predicted for the windows solved", ["pool"]
)
REALISED_SPEND_USD = Counter(
    "omnirouter_realised_spend_usd_total",
    "Cost reported by outcomes whose attempt was stored",
    ["model", "pool"],
)
REALISED_QUALITY = Counter(
    "omnirouter_realised_quality_total",
    "Sum of the quality scores stored (divide by scored outcomes)",
    ["model", "pool"],
)
SCORED_OUTCOMES = Counter(
    "omnirouter_scored_outcomes_total", "Outcomes whose quality score was stored", ["model", "pool"]
)
ANSWERS = Counter(
    "omnirouter_answers_total", "Assignments a model worker answered", ["model", "result"]
)
JUDGE_VERDICTS = Counter(
    "omnirouter_judge_verdicts_total",
    "Responses the judge read, by result "
    "(scored, no_score, skipped_unsampled, skipped_error, skipped_republished)",
    ["model", "result"],
)
JUDGE_SCORE = Counter(
    "omnirouter_judge_score_total",
    "Sum of the judge's scores (divide by the scored verdicts: mean judged quality)",
    ["model"],
)
JUDGE_SPEND_USD = Counter("omnirouter_judge_spend_usd_total", "What the judge's calls cost")
JUDGE_FAILED_BATCHES = Counter(
    "omnirouter_judge_failed_batches_total",
    "Batches of responses the judge gave up on (an unexpected error, logged)",
)
OUTCOMES_WRITTEN = Counter("omnirouter_outcomes_written_total", "Outcomes written to PostgreSQL")
OUTCOME_WRITE_SECONDS = Histogram(
    "omnirouter_outcome_write_seconds", "Time to write one batch of outcomes, retries included"
)
OUTCOME_WRITE_RETRIES = Counter(
    "omnirouter_outcome_write_retries_total", "Outcome batch writes retried (database unavailable)"
)
CONSUMER_LAG = Gauge(
    "omnirouter_consumer_lag_messages",
    "Messages in a partition not yet committed by this worker's group",
    ["topic", "partition"],
)

# First match wins: a dead letter's reason, as a label with few values.
_REASON_KINDS = (
    ("not JSON", "not_json"),
    ("invalid UTF-8", "invalid_utf8"),
    ("empty message", "empty"),
    ("ROUTER_MAX_TEXT_CHARS", "text_too_long"),
    ("producer request size", "too_large"),
    ("undecodable record batch", "undecodable"),
    ("unknown pool", "unknown_pool"),
    ("hints.allowed_models", "hints"),
    ("unknown model", "unknown_model"),
    ("unknown query", "unknown_query"),
    ("which never answered it", "unanswered_model"),
    ("the database cannot store", "unstorable"),
    ("invalid ", "schema"),
)


def reason_kind(reason: str) -> str:
    return next((kind for text, kind in _REASON_KINDS if text in reason), "other")


def serve(port: int, host: str) -> None:
    """Serve /metrics on `host`:`port` (port 0: not at all). A port in use costs the
    metrics, not the worker."""
    if port == 0:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s port %d (%s); set METRICS_HOST, METRICS_PORT",
            host,
            port,
            exc,
        )
        return
    loopback = " (this machine only: METRICS_HOST=0.0.0.0 to be scraped from another)"
    log.info(
        "metrics on http://%s:%d/metrics%s", host, port, loopback if _is_loopback(host) else ""
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def observe_report(report: WindowReport, own_budget: bool = True) -> None:
    """A window solved, once its report is on the broker (workers/stream/publishers.py).
    `own_budget` False: a cascade's escalation window, whose budget is the reserve its
    first stages kept back of budgets counted already."""
    pool = report.pool
    WINDOWS.labels(pool, report.solver_status).inc()
    WINDOW_SOLVE_SECONDS.labels(pool).observe(report.solve_seconds)
    WINDOW_QUERIES.labels(pool).observe(report.query_count)
    PREDICTED_SPEND_USD.labels(pool).inc(report.predicted_spend_usd)
    if own_budget and report.window_budget_usd is not None:
        WINDOW_BUDGET_USD.labels(pool).inc(report.window_budget_usd)
    if report.spend_correction_usd > 0:
        SPEND_CORRECTION_USD.labels(pool).inc(report.spend_correction_usd)
    EXPLORATION_SPEND_USD.labels(pool).inc(report.exploration_spend_usd)
    SHADOW_SPEND_USD.labels(pool).inc(report.shadow_spend_usd)


def observe_assignments(pool: str, assignments: Sequence[Assignment]) -> None:
    """Assignments sent, counted when the decision log marks them published: that
    happens once per query, whichever router (or attempt) completes it."""
    # Summed per model first: a label lookup per assignment was 2-3% of a busy
    # router's event loop.
    shadows: defaultdict[str, int] = defaultdict(int)
    routed: defaultdict[str, int] = defaultdict(int)
    explored: defaultdict[str, int] = defaultdict(int)
    quality: defaultdict[str, float] = defaultdict(float)
    for assignment in assignments:
        if assignment.role == "shadow":
            shadows[assignment.model] += 1
            continue
        routed[assignment.model] += 1
        quality[assignment.model] += assignment.predicted_quality
        explored[assignment.model] += assignment.exploration
    for model, count in shadows.items():
        SHADOWS.labels(model, pool).inc(count)
    for model, count in routed.items():
        ASSIGNMENTS.labels(model, pool).inc(count)
        PREDICTED_QUALITY.labels(model, pool).inc(quality[model])
        if explored[model]:
            EXPLORATIONS.labels(model, pool).inc(explored[model])


def observe_dead_letters(letters: Iterable[DeadLetter]) -> None:
    """Dead letters the broker acknowledged: counted when sent, not when built (a
    window's refusal may be left to another router, a failed send is retried)."""
    for letter in letters:
        DEAD_LETTERS.labels(letter.source_topic, reason_kind(letter.reason)).inc()


def observe_outcomes(written: int, attempts: Iterable[Outcome], scores: Iterable[Outcome]) -> None:
    """Outcomes whose write changed the stored row (`written`; one read again changes
    nothing); of those, the spend of the `attempts` their rows took and the score of
    the `scores` they took (not a judge's score behind a user's, say)."""
    OUTCOMES_WRITTEN.inc(written)
    for outcome in attempts:
        if outcome.cost_usd is not None:
            REALISED_SPEND_USD.labels(outcome.model, outcome.pool).inc(outcome.cost_usd)
    for outcome in scores:
        if outcome.quality_score is not None:
            SCORED_OUTCOMES.labels(outcome.model, outcome.pool).inc()
            REALISED_QUALITY.labels(outcome.model, outcome.pool).inc(outcome.quality_score)


def track_consumer_lag(app: faust.App, every_seconds: float = 5.0) -> None:
    """Publish each partition's lag from Faust's own monitor (end offset seen in
    fetches minus the group's committed offset)."""

    @app.timer(every_seconds)
    async def consumer_lag() -> None:
        monitor = app.monitor
        for tp, end in monitor.tp_end_offsets.items():
            committed = monitor.tp_committed_offsets.get(tp, 0)
            CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - committed))
