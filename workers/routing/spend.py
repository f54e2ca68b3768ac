"""Realised against predicted spend, per pool: what a pool's published assignments
were predicted to cost, matched with what their stored outcomes say they cost.

Windows keep their budget on predicted cost; realised cost differs (an answer's
length is hard to predict), so the router books the difference in the pool's
ledger (workers/stream/pool_ledger.py) and later windows repay an overspend
(workers/routing/windows.py `window_budget_usd`).

Pure, no Kafka and no database: the publisher calls `expect` for what it is about
to send (and `forget` when the window is not published after all), the store
refresh `observe` for each outcome row it reads, and the publisher of a pool's
next window `unbooked` and then `book` once the window's ledger entry is written.
A rebalance keeps only the owned partitions (`keep_partitions`): a pool handed
over is the new owner's to book, and a router it comes back to starts it afresh
from the ledger rather than book what the other owner booked. `observe` runs on
the store refresh's thread, the others on the event loop: one lock guards the state.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

# Published assignments remembered at most. An entry takes about 330-390 bytes
# (its key's query id and model, this record, the ordered dict's slot; measured
# with tracemalloc, the more when its model's name is a string of its own): up to
# about 80 MB at the bound. Entries leave as their outcomes are matched, so in
# flight are only a router's last seconds of assignments (model latency plus the
# store refresh, ROUTER_STORE_REFRESH_SECONDS): 200,000 holds about a minute of
# them at the 3,000 queries/s one router reaches, answers and shadows together;
# a smaller bound would push out slow models' answers at full rate. Those whose
# outcome never brings a cost (a failed answer) stay until pushed out, so a
# long-running router does fill it: the bound is its memory. An entry pushed out
# before its outcome is read corrects nothing.
DEFAULT_MAX_PENDING = 200_000


@dataclass(frozen=True, slots=True)
class Expected:
    partition: int  # the window's partition of omnirouter.predicted: the pool's
    pool: str
    predicted_cost_usd: float


class SpendTracker:
    """Per (partition, pool), realised minus predicted cost of the outcomes matched
    so far and not yet booked in its ledger. A pool lives on one partition of
    omnirouter.predicted (its records are keyed by the pool), so keying by both
    lets a rebalance drop what the router no longer owns."""

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending: OrderedDict[tuple[str, str], Expected] = OrderedDict()
        self._unbooked: dict[tuple[int, str], float] = {}
        self._lock = threading.Lock()

    def expect(
        self, partition: int, pool: str, query_id: str, model: str, predicted_cost_usd: float
    ) -> None:
        """Remember an assignment's predicted cost (before it is sent: its outcome
        may be read before its window's publishing ends) until its outcome is read.
        The same (query, model) again (a probe's model asked again to escalate, a
        decision re-sent) replaces it: its stored row holds one attempt's cost."""
        key = (query_id, model)
        with self._lock:
            self._pending.pop(key, None)
            self._pending[key] = Expected(partition, pool, predicted_cost_usd)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)  # the oldest: it corrects nothing

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """(query, model) expected for a window that was not published (fenced, left
        to the partition's new owner, which expects and books them itself)."""
        with self._lock:
            for key in keys:
                self._pending.pop(key, None)

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
            key = (expected.partition, expected.pool)
            self._unbooked[key] = _finite(self._unbooked.get(key, 0.0) + error)

    def unbooked(self, partition: int, pool: str) -> float:
        """The pool's error matched and not yet booked (what its next ledger entry adds)."""
        with self._lock:
            return self._unbooked.get((partition, pool), 0.0)

    def book(self, partition: int, pool: str, amount_usd: float) -> None:
        """`amount_usd` (an earlier `unbooked`) is in the pool's ledger now; what was
        matched since stays for the next window. Two steps, not one drain: a window
        that is not written (fenced, left to the new owner) books nothing. An error
        dropped meanwhile with its partition (`keep_partitions`) is not taken again."""
        key = (partition, pool)
        with self._lock:
            if key not in self._unbooked:
                return  # 0 booked, or dropped in a rebalance since: nothing to take
            left = _finite(self._unbooked[key] - amount_usd)
            if left == 0.0:
                del self._unbooked[key]
            else:
                self._unbooked[key] = left

    def keep_partitions(self, owned: Collection[int]) -> None:
        """After a rebalance: drop the expected assignments and the unbooked error of
        every partition not in `owned`. The pool's new owner books its outcomes (it
        re-sends what was not marked published, and expects it); kept here, they
        would be booked again should the pool come back to this router."""
        with self._lock:
            for query in [k for k, e in self._pending.items() if e.partition not in owned]:
                del self._pending[query]
            for pool in [k for k in self._unbooked if k[0] not in owned]:
                del self._unbooked[pool]

    @property
    def pending(self) -> int:
        """Assignments waiting for their outcome's cost."""
        with self._lock:
            return len(self._pending)


def _finite(usd: float) -> float:
    """`usd` held within a float's range. Each outcome's cost is finite, but two
    absurd ones (near 1e308, an absurd price) sum to inf, and booking inf left
    inf - inf = NaN unbooked: every later ledger entry of the pool was NaN."""
    return min(max(usd, -sys.float_info.max), sys.float_info.max)
