"""A cascade pool's escalation reserve in its ledger (workers/stream/pool_ledger.py):
each first-stage window's part lives CASCADE_RESERVE_SECONDS, escalations spend
the oldest part first, and an older router's entry (a sum without parts) is read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas import WindowReport
from tests.tables import router_table
from workers.config import Settings
from workers.routing.windows import spend_correction_usd
from workers.stream.pool_ledger import (
    PoolAccount,
    PoolLedger,
    after_escalations,
    after_window,
    live_reserve_usd,
)

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
LIFE = 600.0  # CASCADE_RESERVE_SECONDS


def first_stage(reserve: float) -> WindowReport:
    """A first-stage window that kept `reserve` back for its escalations."""
    return WindowReport(
        window_id="w", pool="c", window_start=T0, window_end=T0, query_count=10,
        mode="budget", window_budget_usd=10.0, predicted_spend_usd=10.0 - reserve,
        predicted_mean_quality=0.8, solver="fast", solver_status="near_optimal",
        solve_seconds=0.0, assignments_per_model={}, escalation_reserve_usd=reserve,
    )  # fmt: skip


def escalations(spent: float) -> WindowReport:
    return first_stage(0.0).model_copy(
        update={"window_id": "c:escalation:1", "escalation_spend_usd": spent}
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_quiet_stretch_s_reserve_cannot_pay_for_a_later_burst() -> None:
    """Reserve kept and not spent is released once it is CASCADE_RESERVE_SECONDS old:
    neither the next window's account nor the escalation stage reads it (before:
    it stayed in the reserve for good)."""
    quiet = after_window(PoolAccount(), first_stage(8.0), now=at(0), reserve_seconds=LIFE)
    assert live_reserve_usd(quiet, at(LIFE - 1), LIFE) == pytest.approx(8.0)
    assert live_reserve_usd(quiet, at(LIFE + 1), LIFE) == 0.0
    burst = after_window(quiet, first_stage(1.0), now=at(LIFE + 1), reserve_seconds=LIFE)
    assert burst.escalation_reserve_usd == pytest.approx(1.0)
    assert live_reserve_usd(burst, at(LIFE + 2), LIFE) == pytest.approx(1.0)


def test_escalations_spend_the_oldest_part_of_the_reserve_first() -> None:
    """The part about to be released is spent first, so what is left lives longest."""
    account = after_window(PoolAccount(), first_stage(5.0), now=at(0), reserve_seconds=LIFE)
    account = after_window(account, first_stage(3.0), now=at(100), reserve_seconds=LIFE)
    account = after_escalations(account, escalations(6.0), now=at(200), reserve_seconds=LIFE)
    assert account.escalation_reserve_usd == pytest.approx(2.0)
    # The first window's part is gone; 2.0 of the second's lives until 100 + LIFE.
    assert live_reserve_usd(account, at(LIFE + 50), LIFE) == pytest.approx(2.0)
    assert live_reserve_usd(account, at(LIFE + 101), LIFE) == 0.0


def test_an_escalation_beyond_the_reserve_is_repaid_by_the_next_first_stages() -> None:
    """A query none of whose probes answered is escalated even beyond the reserve:
    the reserve ends at 0 and what was spent beyond it is owed, so the next
    first-stage window gives it up of its budget (before: it was not owed, and an
    outage of the panel models spent past the pool's budgets for good)."""
    account = after_window(PoolAccount(), first_stage(1.0), now=at(0), reserve_seconds=LIFE)
    after = after_escalations(account, escalations(4.0), now=at(1), reserve_seconds=LIFE)
    assert after.escalation_reserve_usd == 0.0 and after.reserve_kept == []
    assert after.overspend_usd == pytest.approx(3.0)
    # The next window's budget gives up that debt (at most half of a window's each time).
    assert spend_correction_usd(10.0, after.overspend_usd) == pytest.approx(3.0)
    repaid = first_stage(0.0).model_copy(
        update={"spend_correction_usd": 3.0, "window_budget_usd": 7.0, "predicted_spend_usd": 7.0}
    )
    assert after_window(after, repaid, 0.0, now=at(2), reserve_seconds=LIFE).overspend_usd == (
        pytest.approx(0.0)
    )
    # Within the reserve nothing is owed; a quality pool keeps no reserve and owes nothing.
    within = after_escalations(account, escalations(0.5), now=at(1), reserve_seconds=LIFE)
    assert within.overspend_usd == 0.0
    quality = escalations(4.0).model_copy(update={"mode": "quality", "window_budget_usd": None})
    assert after_escalations(PoolAccount(), quality, now=at(1)).overspend_usd == 0.0


def test_an_older_router_s_reserve_counts_as_kept_now() -> None:
    """An entry written before the reserve had parts holds only its sum: read as one
    part kept at the first window after the upgrade, and released a life later."""
    older = PoolAccount.model_validate_json('{"escalation_reserve_usd": 4.0}')
    assert live_reserve_usd(older, at(0), LIFE) == pytest.approx(4.0)
    account = after_window(older, first_stage(1.0), now=at(0), reserve_seconds=LIFE)
    assert account.escalation_reserve_usd == pytest.approx(5.0)
    assert len(account.reserve_kept) == 2
    assert live_reserve_usd(account, at(LIFE + 1), LIFE) == 0.0
    # The entry as written and read back holds the same parts and their sum.
    read = PoolAccount.model_validate_json(account.model_dump_json())
    assert read == account
    assert read.escalation_reserve_usd == sum(p.usd for p in read.reserve_kept)


CASCADE_POOL = {"c": {"mode": "budget", "budget_per_query_usd": 0.01, "cascade": True}}


def test_a_cascade_pool_s_reserve_must_outlive_the_wait_for_its_probes() -> None:
    """The probe deadline (from a query's first answer), the period of its check (a
    quarter of it, at most 5 s) and a window of each stage: 120 + 5 + 2 x 2 = 129 s
    (before: the check's period was left out, and 125 s passed)."""
    for too_short in (123, 125, 129):
        with pytest.raises(ValueError, match=rf"CASCADE_RESERVE_SECONDS={too_short}\.0 must"):
            Settings(
                router_pools=CASCADE_POOL,  # type: ignore[arg-type]
                cascade_reserve_seconds=too_short,
                cascade_probe_deadline_seconds=120,
                router_window_seconds=2,
            )
    enough = Settings(
        router_pools=CASCADE_POOL,  # type: ignore[arg-type]
        cascade_reserve_seconds=130,
        cascade_probe_deadline_seconds=120,
        router_window_seconds=2,
    )
    assert enough.cascade_reserve_seconds == 130
    # Without a cascade pool there is no reserve: a long deadline is no error.
    assert Settings(cascade_probe_deadline_seconds=900).cascade_reserve_seconds == 600
    # Nor with a quality cascade pool: it escalates for its target, keeping no reserve.
    quality_pool = {"q": {"mode": "quality", "quality_target": 0.8, "cascade": True}}
    assert (
        Settings(
            router_pools=quality_pool,  # type: ignore[arg-type]
            cascade_probe_deadline_seconds=900,
        ).cascade_reserve_seconds
        == 600
    )


def test_the_ledger_reads_the_live_reserve_with_its_setting() -> None:
    """PoolLedger.live_reserve_usd, what the escalation stage reads, drops a part
    older than the ledger's CASCADE_RESERVE_SECONDS (its table: a router's)."""
    ledger = PoolLedger(router_table("pool_ledger").table, reserve_seconds=LIFE)
    account = after_window(PoolAccount(), first_stage(3.0), now=at(0), reserve_seconds=LIFE)
    account = after_window(account, first_stage(2.0), now=at(300), reserve_seconds=LIFE)
    key, value = ledger.entry("c", account)
    ledger.remember(0, key, value)
    assert ledger.live_reserve_usd("c", at(LIFE - 1)) == pytest.approx(5.0)
    assert ledger.live_reserve_usd("c", at(LIFE + 1)) == pytest.approx(2.0)
