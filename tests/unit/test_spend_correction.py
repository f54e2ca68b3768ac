"""Budgets kept on realised spend: the SpendTracker's matching, the correction a
window's budget takes, and the overspend its ledger entry books."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest

from schemas import Assignment, WindowReport
from tests.tables import router_table
from tests.unit.test_publishers import Plain, Producers, RecordingProducer, topic
from tests.unit.test_windows import EACH_KIND_OF_BUDGET, MODELS, window
from workers.config import PoolPolicy, Settings, model_topic
from workers.routing.spend import SpendTracker
from workers.routing.windows import (
    REPAY_SHARE,
    WindowBounds,
    route_window,
    window_budget_usd,
)
from workers.stream.app import Topics
from workers.stream.decision_log import DecisionLog
from workers.stream.fencing import PartitionProducers
from workers.stream.pool_ledger import PoolAccount, PoolLedger, after_escalations, after_window
from workers.stream.publishers import (
    AcknowledgedPublisher,
    PoolWindow,
    StartedOnFirstUse,
    TransactionalPublisher,
    WindowRecords,
)
from workers.stream.window_stage import WindowStage, solve_fresh

START = datetime(2026, 12, 1, tzinfo=UTC)


def bounds(overspend: float) -> WindowBounds:
    return WindowBounds("w", START, START + timedelta(seconds=2), overspend)


# ------------------------------------------------------------------ SpendTracker


def test_an_outcome_books_its_error_to_the_assignments_pool() -> None:
    tracker = SpendTracker()
    tracker.expect(0, "gold", "q1", "m", 0.10)
    tracker.expect(0, "bronze", "q2", "m", 0.05)
    tracker.observe("q1", "m", 0.25)
    tracker.observe("q2", "m", 0.01)
    tracker.observe("q3", "m", 9.0)  # never published by this router: nothing
    tracker.observe("q1", "other", 9.0)  # another model's row of the query: nothing
    assert tracker.unbooked(0, "gold") == pytest.approx(0.15)
    assert tracker.unbooked(0, "bronze") == pytest.approx(-0.04)
    assert tracker.pending == 0


def test_a_row_read_twice_counts_once() -> None:
    tracker = SpendTracker()
    tracker.expect(0, "gold", "q1", "m", 0.10)
    tracker.observe("q1", "m", 0.30)
    tracker.observe("q1", "m", 0.30)  # the refresh's overlap, or a later score
    assert tracker.unbooked(0, "gold") == pytest.approx(0.20)


def test_a_row_without_cost_keeps_the_assignment_waiting() -> None:
    tracker = SpendTracker()
    tracker.expect(0, "gold", "q1", "m", 0.10)
    tracker.observe("q1", "m", None)  # an error, or a score before the answer's usage
    assert tracker.unbooked(0, "gold") == 0.0 and tracker.pending == 1
    tracker.observe("q1", "m", 0.12)
    assert tracker.unbooked(0, "gold") == pytest.approx(0.02)


def test_the_oldest_assignment_is_dropped_past_the_bound_and_corrects_nothing() -> None:
    tracker = SpendTracker(max_pending=2)
    for i in range(3):
        tracker.expect(0, "gold", f"q{i}", "m", 0.10)
    assert tracker.pending == 2
    for i in range(3):
        tracker.observe(f"q{i}", "m", 1.10)
    assert tracker.unbooked(0, "gold") == pytest.approx(2.0)  # q1 and q2; q0 was dropped


def test_booking_takes_only_what_was_booked() -> None:
    tracker = SpendTracker()
    tracker.expect(0, "gold", "q1", "m", 0.0)
    tracker.expect(0, "gold", "q2", "m", 0.0)
    tracker.observe("q1", "m", 0.5)
    booked = tracker.unbooked(0, "gold")
    tracker.observe("q2", "m", 0.25)  # matched while the window was being written
    tracker.book(0, "gold", booked)
    assert tracker.unbooked(0, "gold") == pytest.approx(0.25)


def test_absurd_costs_leave_a_finite_error_to_book() -> None:
    """Two finite costs near a float's limit summed to inf, and booking it left
    NaN unbooked: every later window of the pool read NaN from its ledger."""
    tracker = SpendTracker()
    for query in ("q1", "q2", "q3"):
        tracker.expect(0, "gold", query, "m", 0.0)
    tracker.observe("q1", "m", 1.5e308)
    tracker.observe("q2", "m", 1.5e308)
    booked = tracker.unbooked(0, "gold")
    assert math.isfinite(booked)
    tracker.book(0, "gold", booked)
    tracker.observe("q3", "m", 0.25)
    assert tracker.unbooked(0, "gold") == pytest.approx(0.25)


# ------------------------------------------------------------------ the budget


@pytest.mark.parametrize(("policy", "nominal"), EACH_KIND_OF_BUDGET)
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


def report(
    budget: float | None,
    correction: float = 0.0,
    spent: float | None = None,
    reserve: float = 0.0,
) -> WindowReport:
    """A window's report; `spent`: its predicted spend, by default all of its budget."""
    return WindowReport(
        window_id="w", pool="gold", window_start=START, window_end=START,
        query_count=1, mode="budget" if budget is not None else "quality",
        window_budget_usd=budget, predicted_spend_usd=(budget or 0.0) if spent is None else spent,
        predicted_mean_quality=0.5, solver="fast", solver_status="optimal", solve_seconds=0.0,
        assignments_per_model={}, spend_correction_usd=correction, escalation_reserve_usd=reserve,
    )  # fmt: skip


def test_a_window_books_the_error_less_what_it_repaid() -> None:
    account = PoolAccount(overspend_usd=0.3)
    # Nominal 1.0: the window repaid 0.3 (budget 0.7); 0.2 more was matched since.
    after = after_window(account, report(0.7, 0.3), error_usd=0.2)
    assert after.overspend_usd == pytest.approx(0.2)


def test_a_repayment_the_cheapest_plan_cannot_make_stays_owed() -> None:
    """Ten queries at $0.0015 each, the cheapest model $0.001: nominal $0.015, of
    which $0.006 is held back for the debt. The budget left ($0.009) is below the
    cheapest plan ($0.010), which the window takes: it repays $0.005, and $0.001 is
    still owed (it was booked as repaid, and so forgiven)."""
    policy = PoolPolicy(mode="budget", budget_per_query_usd=0.0015)
    account = PoolAccount(overspend_usd=0.006, debt_scale_usd=0.015)
    _, planned = route_window("gold", policy, window(10), MODELS, bounds(0.006))
    assert planned.solver_status == "infeasible_budget_cheapest_plan"
    assert planned.predicted_spend_usd == pytest.approx(0.010)
    after = after_window(account, planned, error_usd=0.0)
    assert after.overspend_usd == pytest.approx(0.001)
    # A window whose nominal budget is below the cheapest plan repays nothing and
    # books no new debt for what it spent beyond it.
    _, beyond = route_window(
        "gold", PoolPolicy(mode="budget", budget_per_query_usd=0.0005), window(10), MODELS,
        bounds(0.006),
    )  # fmt: skip
    assert after_window(account, beyond, error_usd=0.0).overspend_usd == pytest.approx(0.006)


def test_budget_a_window_left_unspent_offsets_answers_that_cost_more() -> None:
    """Planned at 0.9 of its 1.0 and its answers 0.05 dearer than predicted: the
    window kept its budget and owes nothing; the 0.05 left is a credit."""
    after = after_window(PoolAccount(), report(1.0, spent=0.9), error_usd=0.05)
    assert after.overspend_usd == pytest.approx(-0.05)
    # Kept back for escalations is not unspent: the escalation windows spend it.
    kept = after_window(PoolAccount(), report(1.0, spent=0.7, reserve=0.3), error_usd=0.05)
    assert kept.overspend_usd == pytest.approx(0.05)


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
    assert tracker.unbooked(0, "gold") == pytest.approx(0.3)  # not written yet: not booked
    records.remember(first, [], entry)
    assert ledger.account("gold").overspend_usd == pytest.approx(0.3)
    assert tracker.unbooked(0, "gold") == 0.0
    # Booked once: the pool's next window books nothing more of it.
    second = PoolWindow("gold", 0, [assignment("q2", 0.1)], [], report(1.0))
    _, entry = records.report(second)
    assert entry is not None and entry.error_usd == 0.0
    records.remember(second, [], entry)
    assert ledger.account("gold").overspend_usd == pytest.approx(0.3)


# ------------------------------------------------------------------ review fixes
# Names new with these fixes are looked up in the tests' bodies (`pool_ledger.`,
# `router.`), so that against the code before them each test fails on its own.


def test_a_rebalance_drops_the_partitions_taken_away() -> None:
    tracker = SpendTracker()
    tracker.expect(0, "gold", "q1", "m", 0.1)
    tracker.expect(0, "gold", "q2", "m", 0.1)
    tracker.expect(1, "bronze", "q3", "m", 0.1)
    tracker.observe("q1", "m", 0.5)
    booked = tracker.unbooked(0, "gold")  # a window of gold being written meanwhile
    tracker.keep_partitions({1})  # partition 0 went to another router
    tracker.observe("q2", "m", 0.5)  # its new owner's to book
    tracker.observe("q3", "m", 0.2)
    assert tracker.unbooked(0, "gold") == 0.0 and tracker.pending == 0
    assert tracker.unbooked(1, "bronze") == pytest.approx(0.1)
    tracker.book(0, "gold", booked)  # written after the drop: takes nothing of later error
    tracker.expect(0, "gold", "q4", "m", 0.1)  # the pool back
    tracker.observe("q4", "m", 0.2)
    assert tracker.unbooked(0, "gold") == pytest.approx(0.1)


def test_a_pool_that_comes_back_does_not_book_its_earlier_stay_again() -> None:
    """Finding 1: the router's assignment hook (router.py) drops what the pool left
    behind; the pool's new owner re-sent the same assignment and booked its outcome."""
    from faust.types import TP

    from workers.stream import router

    tracker = SpendTracker()
    records = spend_records(tracker)
    hook = router.keeps_owned_spend(tracker, "predicted")
    records.expect(PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0)))
    asyncio.run(hook({TP("predicted", 1), TP("changelog", 0)}))  # partition 0 taken away
    tracker.observe("q1", "m", 0.5)  # the outcome, booked by the new owner
    asyncio.run(hook({TP("predicted", 0), TP("predicted", 1)}))  # and back
    _, entry = records.report(PoolWindow("gold", 0, [assignment("q2", 0.1)], [], report(1.0)))
    assert entry is not None and entry.error_usd == 0.0


def test_the_overspend_is_capped_at_max_debt_windows_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 2: answers costing far more than predicted (wrong model prices) keep
    at most MAX_DEBT_WINDOWS nominal budgets of debt, and say so."""
    from workers.stream import pool_ledger

    cap = pool_ledger.MAX_DEBT_WINDOWS * 1.0
    account = PoolAccount(overspend_usd=cap - 0.2)
    with caplog.at_level(logging.WARNING, logger=pool_ledger.__name__):
        after = after_window(account, report(0.5, 0.5), error_usd=3.0)  # nominal 1.0
    assert after.overspend_usd == pytest.approx(cap)
    assert any(
        "gold" in r.getMessage() and "model prices" in r.getMessage() for r in caplog.records
    )
    # Within the cap: kept as booked, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=pool_ledger.__name__):
        below = after_window(PoolAccount(overspend_usd=1.0), report(0.5, 0.5), error_usd=0.2)
    assert below.overspend_usd == pytest.approx(0.7) and not caplog.records


def test_a_window_without_nominal_budget_keeps_the_overspend_as_booked() -> None:
    """Finding 3: an hourly budget's window with no new time (nominal 0) neither
    wipes a credit nor caps a debt: both wait for the next window with a budget."""
    credit = after_window(PoolAccount(overspend_usd=-0.5), report(0.0), error_usd=-0.1)
    assert credit.overspend_usd == pytest.approx(-0.6)
    debt = after_window(PoolAccount(overspend_usd=9.0), report(0.0), error_usd=1.0)
    assert debt.overspend_usd == pytest.approx(10.0)


def spend_records(tracker: SpendTracker) -> WindowRecords:
    topics = cast(Topics, SimpleNamespace(windows=topic("windows"), deadletter=topic("letters")))
    ledger = PoolLedger(router_table("pool_ledger").table)
    return WindowRecords(topics, DecisionLog(router_table("routed").table), ledger, tracker)


def next_error(records: WindowRecords) -> float:
    """The spend error the pool's next first-stage window would book."""
    _, entry = records.report(PoolWindow("gold", 0, [assignment("later", 0.1)], [], report(1.0)))
    assert entry is not None
    return entry.error_usd


async def test_an_outcome_read_while_its_window_is_published_is_matched() -> None:
    """Finding 4, without transactions: the outcome of an assignment sent, read (a
    slow acknowledgement of the window's last records) before `publish` returns."""
    tracker = SpendTracker()
    records = spend_records(tracker)
    producer = RecordingProducer(hold_acks=True)
    acknowledged = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    window = PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0))
    publishing = asyncio.ensure_future(acknowledged.publish(window, lambda: True))
    deadline = asyncio.get_running_loop().time() + 5.0
    read = False
    while not publishing.done():
        assert asyncio.get_running_loop().time() < deadline, "publishing never ended"
        if not read and any(t == model_topic("m") for t, _, _ in producer.sent):
            tracker.observe("q1", "m", 0.4)  # stored and read once, before the window ends
            read = True
        for ack in producer.acks:
            if not ack.done():
                ack.set_result(None)
        await asyncio.sleep(0)
    assert publishing.result()
    assert next_error(records) == pytest.approx(0.3)


class ReadDuringCommit(Producers):
    """Transactions that, before committing, have the store refresh read an outcome."""

    def __init__(self, fenced: bool, read: Callable[[], None]) -> None:
        super().__init__(fenced)
        self.read = read

    @asynccontextmanager
    async def transaction(self, partition: int) -> AsyncIterator[RecordingProducer]:
        async with super().transaction(partition) as producer:
            yield producer
            self.read()


async def test_an_outcome_read_before_its_transaction_commits_is_matched() -> None:
    """Finding 4, with transactions: the assignment is expected before it is sent."""
    tracker = SpendTracker()
    records = spend_records(tracker)
    producers = ReadDuringCommit(False, lambda: tracker.observe("q1", "m", 0.4))
    publisher = TransactionalPublisher(records, cast(PartitionProducers, producers))
    window = PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0))
    assert await publisher.publish(window, lambda: True)
    assert next_error(records) == pytest.approx(0.3)


async def test_a_fenced_transactional_window_books_nothing_and_forgets_its_expects() -> None:
    tracker = SpendTracker()
    records = spend_records(tracker)
    records.expect(PoolWindow("gold", 0, [assignment("earlier", 0.1)], [], None))
    tracker.observe("earlier", "m", 0.3)  # 0.2 over, to be booked by the next window
    publisher = TransactionalPublisher(records, cast(PartitionProducers, Producers(fenced=True)))
    window = PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0))
    assert not await publisher.publish(window, lambda: False)
    assert tracker.pending == 0  # the new owner expects them
    tracker.observe("q1", "m", 0.4)
    assert records.ledger.account("gold").overspend_usd == 0.0  # nothing written
    assert next_error(records) == pytest.approx(0.2)  # still to book, and only that


async def test_the_acknowledged_decided_path_books_once() -> None:
    """A window whose report goes with its decisions (then handed over, or not):
    its error is booked with that ledger entry, not again with the published markers."""
    for current in (True, False):
        tracker = SpendTracker()
        records = spend_records(tracker)
        records.expect(PoolWindow("gold", 0, [assignment("earlier", 0.1)], [], None))
        tracker.observe("earlier", "m", 0.4)
        acknowledged = AcknowledgedPublisher(
            records, cast(StartedOnFirstUse, Plain(RecordingProducer()))
        )
        window = PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0))
        assert await acknowledged.publish(window, lambda c=current: c) is current
        assert records.ledger.account("gold").overspend_usd == pytest.approx(0.3)
        assert next_error(records) == 0.0


def test_a_window_without_a_budget_expects_nothing() -> None:
    """Finding 5: quality-mode windows have no budget to correct."""
    tracker = SpendTracker()
    records = spend_records(tracker)
    records.expect(PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(None)))
    assert tracker.pending == 0
    records.expect(PoolWindow("gold", 0, [assignment("q2", 0.1)], [], report(1.0)))
    assert tracker.pending == 1


@pytest.mark.parametrize("correction", [True, False])
async def test_a_window_repays_the_ledgers_overspend_only_with_the_correction_on(
    correction: bool,
) -> None:
    ledger = PoolLedger(router_table("pool_ledger").table)
    account = PoolAccount(overspend_usd=0.3, exploration_carried_usd=0.7)
    ledger.remember(0, *ledger.entry("gold", account))
    seen: list[WindowBounds] = []
    carried: list[float] = []

    async def cascade(
        stage: Any, pool: str, fresh: Any, bounds: WindowBounds, carried_usd: float
    ) -> Any:
        seen.append(bounds)
        carried.append(carried_usd)
        return "solved"

    settings = Settings(router_spend_correction=correction)
    stage = SimpleNamespace(settings=settings, ledger=ledger, cascade=cascade)
    fresh = [SimpleNamespace(query=SimpleNamespace(created_at=START))]
    solved = await solve_fresh(cast(WindowStage, stage), "gold", cast(Any, fresh), "w")
    assert solved == "solved"
    assert seen[0].overspend_usd == (pytest.approx(0.3) if correction else 0.0)
    assert carried == [pytest.approx(0.7)]  # the pool's allowance, for its exploration


# ------------------------------------------------------------------ third review


def test_an_outcome_whose_cost_overflows_never_poisons_the_ledger() -> None:
    """A cost of 1e400 holds no NaN or Infinity for the codec to refuse, but reads as
    inf. Stored and matched, its error was capped at the ledger's ceiling, then the
    tracker kept inf - inf = NaN: the next entry's overspend was NaN, written as
    null, which the ledger reads as an incompatible entry, so every later window
    started the pool afresh (its billed time, debt and reserve lost). The outcome
    writer dead-letters it instead: a cost is a finite number."""
    from workers.stream.codec import BadEvent
    from workers.stream.outcomes import validate_outcome

    tracker = SpendTracker()
    records = spend_records(tracker)
    records.expect(PoolWindow("gold", 0, [assignment("q1", 0.1)], [], report(1.0)))
    raw = b'{"query_id": "q1", "model": "m", "cost_usd": 1e400}'
    try:  # what the outcome writer stores, and the store refresh then reads
        outcome = validate_outcome(raw, Settings(router_models=["m"]))
        tracker.observe(outcome.query_id, outcome.model, outcome.cost_usd)
    except BadEvent:
        pass  # a dead letter: never stored
    for second in (1, 2):
        ends = report(1.0).model_copy(update={"window_end": START + timedelta(seconds=second)})
        window = PoolWindow("gold", 0, [assignment(f"w{second}", 0.1)], [], ends)
        _, entry = records.report(window)
        records.remember(window, [], entry)
    account = records.ledger.account("gold")
    assert account.billed_until == START + timedelta(seconds=2)
    assert math.isfinite(account.overspend_usd)


def test_a_small_window_does_not_forgive_the_debt_larger_windows_ran_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The debt's ceiling was MAX_DEBT_WINDOWS times the nominal budget of the window
    that books it: answers of a 100-query window (budget per query) 10% dearer
    than predicted, matched in time for the next window of one query, left 0.04 of
    their 0.10 owed (the rest forgiven: spent beyond the budget for good) and a
    WARNING blaming the model prices. The same befalls an hourly budget's burst,
    whose windows after the first bring next to no new time."""
    from workers.stream import pool_ledger

    per_query = 0.01
    large = after_window(PoolAccount(), report(100 * per_query), error_usd=0.0)
    with caplog.at_level(logging.WARNING, logger=pool_ledger.__name__):
        small = after_window(large, report(per_query), error_usd=0.10)
    assert small.overspend_usd == pytest.approx(0.10)
    assert not caplog.records
    # Windows that stay small bring the ceiling down to theirs (halved every
    # MAX_DEBT_WINDOWS windows): persistent overspend is still capped.
    account = small
    for _ in range(10 * pool_ledger.MAX_DEBT_WINDOWS):
        account = after_window(account, report(per_query), error_usd=0.10)
    assert account.overspend_usd == pytest.approx(pool_ledger.MAX_DEBT_WINDOWS * per_query)
