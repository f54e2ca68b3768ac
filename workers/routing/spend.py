"""Realised against predicted spend, per pool: what a pool's published assignments
were predicted to cost, matched with what their stored outcomes say they cost.

Windows keep their budget on predicted cost; realised cost differs (an answer's
length is hard to predict), so the router books the difference in the pool's
ledger (workers/stream/pool_ledger.py) and later windows repay an overspend
(workers/routing/windows.py `window_budget_usd`).

Pure, no Kafka and no database: the publisher calls `expect` for what it sends,
the store refresh `observe` for each outcome row it reads, and the publisher of
a pool's next window `unbooked` and then `book` once the window's ledger entry is
written. `observe` runs on the store refresh's thread, the others on the event
loop: one lock guards the state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

# Published assignments remembered at most (about 100 bytes each): a router's
# assignments of the last minutes at a few hundred queries a second. An entry
# dropped before its outcome is read corrects nothing.
DEFAULT_MAX_PENDING = 200_000


@dataclass(frozen=True)
class Expected:
    pool: str
    predicted_cost_usd: float


class SpendTracker:
    """Per pool, realised minus predicted cost of the outcomes matched so far and
    not yet booked in its ledger."""

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending: OrderedDict[tuple[str, str], Expected] = OrderedDict()
        self._unbooked: dict[str, float] = {}
        self._lock = threading.Lock()

    def expect(self, pool: str, query_id: str, model: str, predicted_cost_usd: float) -> None:
        """Remember a published assignment's predicted cost until its outcome is read.
        The same (query, model) again (a probe's model asked again to escalate, a
        decision re-sent) replaces it: its stored row holds one attempt's cost."""
        key = (query_id, model)
        with self._lock:
            self._pending.pop(key, None)
            self._pending[key] = Expected(pool, predicted_cost_usd)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)  # the oldest: it corrects nothing

    def observe(self, query_id: str, model: str, cost_usd: float | None) -> None:
        """An outcome row read from the store: for a remembered assignment with a
        realised cost, its error goes to its pool's unbooked error and the entry is
        forgotten, so a row read again (the refresh's overlap, a later score)
        counts once. Without a cost (an error, a score alone) it keeps waiting."""
        if cost_usd is None:
            return
        with self._lock:
            expected = self._pending.pop((query_id, model), None)
            if expected is None:
                return
            error = cost_usd - expected.predicted_cost_usd
            self._unbooked[expected.pool] = self._unbooked.get(expected.pool, 0.0) + error

    def unbooked(self, pool: str) -> float:
        """The pool's error matched and not yet booked (what its next ledger entry adds)."""
        with self._lock:
            return self._unbooked.get(pool, 0.0)

    def book(self, pool: str, amount_usd: float) -> None:
        """`amount_usd` (an earlier `unbooked`) is in the pool's ledger now; what was
        matched since stays for the next window. Two steps, not one drain: a window
        that is not written (fenced, left to the new owner) books nothing."""
        with self._lock:
            left = self._unbooked.get(pool, 0.0) - amount_usd
            if left == 0.0:
                self._unbooked.pop(pool, None)
            else:
                self._unbooked[pool] = left

    @property
    def pending(self) -> int:
        """Assignments waiting for their outcome's cost."""
        with self._lock:
            return len(self._pending)
