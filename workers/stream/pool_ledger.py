"""Per pool, what its windows have used up: production time billed so far (an
hourly budget pays each second once), the exploration allowance carried,
(cascade pools) the escalation reserve: what first-stage windows kept back of
their budgets for the escalation windows, less what those spent (oldest first),
each part released once it is CASCADE_RESERVE_SECONDS old (the router's clock),
so a quiet stretch's unspent reserve cannot pay for a later burst; and the
overspend: realised minus predicted cost of its answers, less what its windows
left unspent, not yet taken off a budget (workers/routing/spend.py,
workers/routing/windows.py `window_budget_usd`).

Kept in a Faust table whose compacted changelog is partitioned like the pool's
omnirouter.predicted partition, so the router that takes the pool over after a
restart or a rebalance goes on from where the last one stood instead of billing
the same time again or exploring from nothing. The table holds only the pools of
the partitions this router owns (workers/stream/table_store.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from faust.types import TableT
from pydantic import BaseModel

from schemas import WindowReport
from workers.stream.table_store import write

log = logging.getLogger(__name__)

# The overspend a pool's ledger keeps at most, in windows' nominal budgets: repaid
# at most REPAY_SHARE (half) of each window (workers/routing/windows.py), it is
# worked off within 2 x MAX_DEBT_WINDOWS windows once answers cost what they are
# predicted to, while windows keep their size; after windows shrink from budget B
# to b (the ceiling counts in recent larger windows, `debt_scale_usd`), within
# about 2 x MAX_DEBT_WINDOWS + MAX_DEBT_WINDOWS x log2(B / b).
MAX_DEBT_WINDOWS = 4
# The budget that ceiling is counted in (`debt_scale_usd`) halves every MAX_DEBT_WINDOWS
# windows smaller than the largest before them.
DEBT_SCALE_DECAY = 0.5 ** (1 / MAX_DEBT_WINDOWS)


class ReserveKept(BaseModel):
    """A part of the escalation reserve: what one first-stage window kept back, less
    what escalations took of it, and when (the router's clock)."""

    kept_at: datetime
    usd: float


class PoolAccount(BaseModel):
    billed_until: datetime | None = None
    exploration_carried_usd: float = 0.0
    # The sum of `reserve_kept` when the entry was written (what an older router,
    # which knows no parts, reads); what may be spent now is `live_reserve_usd`.
    escalation_reserve_usd: float = 0.0
    reserve_kept: list[ReserveKept] = []
    # Realised minus predicted spend, and what forced escalations spent beyond the
    # reserve (`after_escalations`), less what windows left unspent, not yet taken
    # off a budget, at most MAX_DEBT_WINDOWS nominal budgets; below 0, a credit (of
    # at most one window's budget) that offsets later overspend, never spent. What a
    # router matched in memory (workers/routing/spend.py) and had not booked with a
    # window yet is dropped when it stops or hands the pool over: the error of the
    # outcomes read since the pool's last window, bounded by a few windows'.
    overspend_usd: float = 0.0
    # The nominal budget that caps the overspend (`debt_scale_usd`).
    debt_scale_usd: float = 0.0


def repaid_usd(report: WindowReport) -> float:
    """What a budget window repaid: what its plan left of its nominal budget, neither
    spent nor kept back for escalations. The pool's promise is realised spend within
    its budgets, so budget a window did not use offsets answers that cost more than
    predicted, as answers that cost less do: a window planned at 90% of its budget
    whose answers then cost 5% more than predicted has kept its budget and owes
    nothing. It is what the plan left, not the correction it was asked for: a
    window whose cheapest plan costs more than the budget the correction left
    repays less, and the rest stays owed (counting the correction as repaid forgave
    it). A plan beyond the nominal budget (an unreachable budget's cheapest plan)
    repays nothing and books no debt."""
    nominal = _nominal_usd(report)
    if nominal is None:
        return 0.0
    planned = report.predicted_spend_usd + report.escalation_reserve_usd
    return max(nominal - planned, 0.0)


def _nominal_usd(report: WindowReport) -> float | None:
    """The window's budget before what it repaid (`spend_correction_usd`); None in
    quality mode."""
    if report.window_budget_usd is None:
        return None
    return report.window_budget_usd + report.spend_correction_usd


def debt_scale_usd(account: PoolAccount, report: WindowReport) -> float:
    """The nominal budget the pool's overspend is capped by after this window: the
    window's, or the largest of the pool's windows before it if more, halving every
    MAX_DEBT_WINDOWS windows. The error a window books is that of earlier windows'
    answers, so a small window (one query at a budget per query, an hourly budget's
    burst after its first window) must not cut the debt larger ones ran up to four
    of its own budgets; windows that stay small bring the ceiling down to theirs.
    A window without nominal budget leaves it as it was."""
    nominal = _nominal_usd(report)
    if nominal is None:
        return 0.0
    if nominal <= 0.0:
        return account.debt_scale_usd
    return max(nominal, DEBT_SCALE_DECAY * account.debt_scale_usd)


def booked_overspend(
    account: PoolAccount, report: WindowReport, error_usd: float | None, scale_usd: float
) -> float:
    """The pool's overspend after a first-stage window: what it was, plus the error
    (realised - predicted) matched since the last window was written, less what
    this window left of its nominal budget (`repaid_usd`); floored at minus
    the window's nominal budget and capped at MAX_DEBT_WINDOWS of `scale_usd` (its
    `debt_scale_usd`; answers costing persistently more than predicted, wrong
    ROUTER_MODEL_PRICES say, would otherwise leave a debt repaid for as many
    windows after the prices are fixed; a WARNING names the pool). A window of nominal
    budget 0 (an hourly budget's window with no new time) has no scale to floor or
    cap by: the overspend is kept as booked, plus the error, for the next window
    with a budget. None: the correction is off (ROUTER_SPEND_CORRECTION=false),
    and a quality-mode pool has no budget to correct: nothing is kept."""
    nominal = _nominal_usd(report)
    if error_usd is None or nominal is None:
        return 0.0
    booked = account.overspend_usd + error_usd - repaid_usd(report)
    if nominal <= 0.0:
        return booked
    ceiling = MAX_DEBT_WINDOWS * scale_usd
    if booked > ceiling:
        log.warning(
            "pool %s: realised spend over predicted reached %.4f USD, kept at %d windows' "
            "budget (%.4f USD): answers cost far more than predicted; check the model "
            "prices (ROUTER_MODEL_PRICES)",
            report.pool, booked, MAX_DEBT_WINDOWS, ceiling,
        )  # fmt: skip
        return ceiling
    return max(booked, -nominal)


def reserve_within(
    account: PoolAccount, now: datetime, reserve_seconds: float = math.inf
) -> list[ReserveKept]:
    """The parts of the pool's escalation reserve kept less than `reserve_seconds`
    before `now`, oldest first (by when they were kept: routers taking the pool
    over may have written them). An older router's entry (a sum without parts)
    counts as kept now."""
    if not account.reserve_kept:
        usd = account.escalation_reserve_usd
        return [ReserveKept(kept_at=now, usd=usd)] if usd > 0 else []
    parts = sorted(account.reserve_kept, key=lambda part: part.kept_at)
    if math.isinf(reserve_seconds):
        return parts
    oldest = now - timedelta(seconds=reserve_seconds)
    return [part for part in parts if part.kept_at >= oldest]


def live_reserve_usd(
    account: PoolAccount, now: datetime, reserve_seconds: float = math.inf
) -> float:
    """What the pool's escalation windows may spend at `now` (`reserve_within`)."""
    return sum(part.usd for part in reserve_within(account, now, reserve_seconds))


def with_reserve(account: PoolAccount, parts: list[ReserveKept]) -> PoolAccount:
    kept = [part for part in parts if part.usd > 0]
    return account.model_copy(
        update={"reserve_kept": kept, "escalation_reserve_usd": sum(p.usd for p in kept)}
    )


def spend_oldest_first(parts: list[ReserveKept], usd: float) -> list[ReserveKept]:
    """The reserve's parts once `usd` is taken from them, oldest first (what is taken
    beyond the whole reserve, a query escalated of necessity, leaves every part at 0:
    `after_escalations` books it as overspend)."""
    left: list[ReserveKept] = []
    for part in parts:
        taken = min(part.usd, usd)
        usd -= taken
        left.append(part.model_copy(update={"usd": part.usd - taken}))
    return left


def after_window(
    account: PoolAccount,
    report: WindowReport,
    error_usd: float | None = 0.0,
    now: datetime | None = None,
    reserve_seconds: float = math.inf,
) -> PoolAccount:
    """The account after a (first-stage) window: its time billed, its exploration
    allowance carried, its escalation reserve added to what is kept back (less the
    parts older than `reserve_seconds` at `now`, default the router's clock), and
    its overspend booked (`booked_overspend`)."""
    now = now or datetime.now(UTC)
    parts = reserve_within(account, now, reserve_seconds)
    parts.append(ReserveKept(kept_at=now, usd=report.escalation_reserve_usd))
    scale = debt_scale_usd(account, report)
    written = PoolAccount(
        billed_until=report.window_end,
        exploration_carried_usd=report.exploration_carried_usd,
        overspend_usd=booked_overspend(account, report, error_usd, scale),
        debt_scale_usd=scale,
    )
    return with_reserve(written, parts)


def after_escalations(
    account: PoolAccount,
    report: WindowReport,
    now: datetime | None = None,
    reserve_seconds: float = math.inf,
) -> PoolAccount:
    """The account after an escalation window: its spend taken from the reserve,
    oldest part first. A query none of whose probes answered is escalated even
    beyond the reserve (never below 0): in budget mode what it spent beyond is
    booked as overspend, which the pool's next first-stage windows repay like any
    other (`booked_overspend`), so an outage of the panel models cannot spend past
    the pool's budgets for good. An escalation window has no budget of its own."""
    parts = reserve_within(account, now or datetime.now(UTC), reserve_seconds)
    beyond = max(report.escalation_spend_usd - sum(part.usd for part in parts), 0.0)
    spent = with_reserve(account, spend_oldest_first(parts, report.escalation_spend_usd))
    if report.mode != "budget" or beyond <= 0.0:
        return spent
    return spent.model_copy(update={"overspend_usd": account.overspend_usd + beyond})


@dataclass
class PoolLedger:
    table: TableT
    # How long a first-stage window's escalation reserve lives (CASCADE_RESERVE_SECONDS).
    reserve_seconds: float = math.inf
    # One publisher at a time per pool: a first-stage and an escalation window of
    # the same pool each update its account from the one the other wrote.
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, pool: str) -> asyncio.Lock:
        return self._locks.setdefault(pool, asyncio.Lock())

    def live_reserve_usd(self, pool: str, now: datetime) -> float:
        """What the pool's escalation windows may spend at `now`: the reserve its first
        stages kept back in the last `reserve_seconds`, less what escalations took."""
        return live_reserve_usd(self.account(pool), now, self.reserve_seconds)

    def account(self, pool: str) -> PoolAccount:
        raw = self.table.data.get(pool.encode())
        if raw is None:
            return PoolAccount()
        try:
            return PoolAccount.model_validate_json(raw)
        except ValueError:  # an entry of an incompatible version: start the pool afresh
            return PoolAccount()

    @property
    def changelog(self) -> str:
        return str(self.table.changelog_topic.get_topic_name())

    def entry(self, pool: str, account: PoolAccount) -> tuple[bytes, bytes]:
        """(key, value) of the pool's account, as written to the changelog."""
        return pool.encode(), account.model_dump_json().encode()

    def remember(self, partition: int, key: bytes, value: bytes) -> None:
        """Take an entry the publisher wrote to `partition` of the changelog
        (workers/stream/publishers.py); losing the last one in a crash only re-bills
        that window's time once, when it is replayed."""
        write(self.table, partition, key, value)
