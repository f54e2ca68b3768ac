"""Budgets kept on realised spend: the SpendTracker's matching, the correction a
window's budget takes, and the overspend its ledger entry books."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

import pytest

from schemas import Assignment, WindowReport
from tests.tables import router_table
from tests.unit.test_windows import MODELS, window
from workers.config import PoolPolicy
from workers.routing.spend import SpendTracker
from workers.routing.windows import (
    REPAY_SHARE,
    WindowBounds,
    route_window,
    window_budget_usd,
)
from workers.stream.app import Topics
from workers.stream.decision_log import DecisionLog
from workers.stream.pool_ledger import PoolAccount, PoolLedger, after_escalations, after_window
from workers.stream.publishers import PoolWindow, WindowRecords

START = datetime(2026, 12, 1, tzinfo=UTC)


def bounds(overspend: float) -> WindowBounds:
    return WindowBounds("w", START, START + timedelta(seconds=2), overspend)


# ------------------------------------------------------------------ SpendTracker


def test_an_outcome_books_its_error_to_the_assignments_pool() -> None:
    tracker = SpendTracker()
    tracker.expect("gold", "q1", "m", 0.10)
    tracker.expect("bronze", "q2", "m", 0.05)
    tracker.observe("q1", "m", 0.25)
    tracker.observe("q2", "m", 0.01)
    tracker.observe("q3", "m", 9.0)  # never published by this router: nothing
    tracker.observe("q1", "other", 9.0)  # another model's row of the query: nothing
    assert tracker.unbooked("gold") == pytest.approx(0.15)
    assert tracker.unbooked("bronze") == pytest.approx(-0.04)
    assert tracker.pending == 0


def test_a_row_read_twice_counts_once() -> None:
    tracker = SpendTracker()
    tracker.expect("gold", "q1", "m", 0.10)
    tracker.observe("q1", "m", 0.30)
    tracker.observe("q1", "m", 0.30)  # the refresh's overlap, or a later score
    assert tracker.unbooked("gold") == pytest.approx(0.20)


def test_a_row_without_cost_keeps_the_assignment_waiting() -> None:
    tracker = SpendTracker()
    tracker.expect("gold", "q1", "m", 0.10)
    tracker.observe("q1", "m", None)  # an error, or a score before the answer's usage
    assert tracker.unbooked("gold") == 0.0 and tracker.pending == 1
    tracker.observe("q1", "m", 0.12)
    assert tracker.unbooked("gold") == pytest.approx(0.02)


def test_the_oldest_assignment_is_dropped_past_the_bound_and_corrects_nothing() -> None:
    tracker = SpendTracker(max_pending=2)
    for i in range(3):
        tracker.expect("gold", f"q{i}", "m", 0.10)
    assert tracker.pending == 2
    for i in range(3):
        tracker.observe(f"q{i}", "m", 1.10)
    assert tracker.unbooked("gold") == pytest.approx(2.0)  # q1 and q2; q0 was dropped


def test_booking_takes_only_what_was_booked() -> None:
    tracker = SpendTracker()
    tracker.expect("gold", "q1", "m", 0.0)
    tracker.expect("gold", "q2", "m", 0.0)
    tracker.observe("q1", "m", 0.5)
    booked = tracker.unbooked("gold")
    tracker.observe("q2", "m", 0.25)  # matched while the window was being written
    tracker.book("gold", booked)
    assert tracker.unbooked("gold") == pytest.approx(0.25)


# ------------------------------------------------------------------ the budget


@pytest.mark.parametrize(
    ("policy", "nominal"),
    [
        (PoolPolicy(mode="budget", window_budget_usd=3.0), 3.0),
        (PoolPolicy(mode="budget", budget_per_hour_usd=3600.0), 2.0),  # 2 s of $1/s
        (PoolPolicy(mode="budget", budget_per_query_usd=0.5), 5.0),  # 10 queries
    ],
)
def test_every_kind_of_budget_repays_overspend_up_to_its_share(
    policy: PoolPolicy, nominal: float
) -> None:
    assert window_budget_usd(policy, bounds(0.0), 10) == pytest.approx(nominal)
    small = 0.1 * nominal
    assert window_budget_usd(policy, bounds(small), 10) == pytest.approx(nominal - small)
    assert window_budget_usd(policy, bounds(10 * nominal), 10) == pytest.approx(
        (1 - REPAY_SHARE) * nominal
    )
    # A credit (spent less than predicted) never raises the budget: it is a ceiling.
    assert window_budget_usd(policy, bounds(-nominal), 10) == pytest.approx(nominal)


def test_a_window_reports_what_it_gave_up() -> None:
    policy = PoolPolicy(mode="budget", budget_per_query_usd=0.02)
    _, report = route_window("gold", policy, window(10), MODELS, bounds(0.05))
    assert report.window_budget_usd == pytest.approx(0.15)
    assert report.spend_correction_usd == pytest.approx(0.05)
    assert report.predicted_spend_usd <= 0.15 + 1e-12
    quality = PoolPolicy(mode="quality", quality_target=0.6)
    _, report = route_window("gold", quality, window(10), MODELS, bounds(0.05))
    assert report.spend_correction_usd == 0.0 and report.window_budget_usd is None


# ------------------------------------------------------------------ the ledger


def report(budget: float | None, correction: float = 0.0) -> WindowReport:
    return WindowReport(
        window_id="w", pool="gold", window_start=START, window_end=START,
        query_count=1, mode="budget" if budget is not None else "quality",
        window_budget_usd=budget, predicted_spend_usd=0.0, predicted_mean_quality=0.5,
        solver="fast", solver_status="optimal", solve_seconds=0.0, assignments_per_model={},
        spend_correction_usd=correction,
    )  # fmt: skip


def test_a_window_books_the_error_less_what_it_repaid() -> None:
    account = PoolAccount(overspend_usd=0.3)
    # Nominal 1.0: the window repaid 0.3 (budget 0.7); 0.2 more was matched since.
    after = after_window(account, report(0.7, 0.3), error_usd=0.2)
    assert after.overspend_usd == pytest.approx(0.2)


def test_a_credit_is_floored_at_one_windows_nominal_budget() -> None:
    after = after_window(PoolAccount(overspend_usd=-0.5), report(1.0), error_usd=-3.0)
    assert after.overspend_usd == pytest.approx(-1.0)
    # It offsets later overspend: the next window repays nothing of 0.8 more.
    again = after_window(after, report(1.0), error_usd=0.8)
    assert again.overspend_usd == pytest.approx(-0.2)


def test_correction_off_or_no_budget_keeps_no_overspend() -> None:
    account = PoolAccount(overspend_usd=0.3)
    assert after_window(account, report(1.0), error_usd=None).overspend_usd == 0.0
    assert after_window(account, report(None), error_usd=0.5).overspend_usd == 0.0


def test_an_escalation_window_leaves_the_overspend_to_the_first_stage() -> None:
    account = PoolAccount(overspend_usd=0.3, escalation_reserve_usd=1.0)
    assert after_escalations(account, report(1.0)).overspend_usd == pytest.approx(0.3)


# ------------------------------------------------------------------ the publisher


def assignment(query_id: str, cost: float) -> Assignment:
    return Assignment(
        query_id=query_id, text="t", model="m", pool="gold", window_id="w",
        window_start=START, window_end=START, predicted_quality=0.5, predicted_cost_usd=cost,
    )  # fmt: skip


def test_the_ledger_entry_books_the_error_once_when_written() -> None:
    tracker = SpendTracker()
    topics = cast(Topics, SimpleNamespace(windows=SimpleNamespace(get_topic_name=lambda: "w")))
    ledger = PoolLedger(router_table("pool_ledger").table)
    records = WindowRecords(topics, DecisionLog(router_table("routed").table), ledger, tracker)
    first = PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0))
    records.expect(first)
    tracker.observe("q1", "m", 0.4)

    _, entry = records.report(first)
    assert entry is not None and entry.error_usd == pytest.approx(0.3)
    assert tracker.unbooked("gold") == pytest.approx(0.3)  # not written yet: not booked
    records.remember(first, [], entry)
    assert ledger.account("gold").overspend_usd == pytest.approx(0.3)
    assert tracker.unbooked("gold") == 0.0
    # A window read again after a crash has no report: it books nothing.
    again = PoolWindow("gold", 0, [], [assignment("q1", 0.1)], None)
    assert records.report(again) == ([], None)
