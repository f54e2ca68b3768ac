"""The router's tables' in-memory store: Faust's memory store, holding only the keys
of the changelog partitions this worker owns (is active for).

Faust's memory store forgets the keys of a partition taken away only for keys it
recovered from the changelog, and only once the next recovery completes; the
router writes most entries itself (the publishers, the probe gatherer), and those
stayed in memory after their partition moved to another router. A router then
acted on entries it no longer owns: it forwarded another router's probes past
their deadline and forgot (tombstoned) another router's decisions, and could
read a stale entry should the partition come back with the key's tombstone
compacted away. Standby partitions' changelogs went into the same memory too
(Faust applies them to the table's store).

Here every key carries its changelog partition: from recovery (each changelog
event has its partition) and from the router's own writes (`write`, which know
the partition they wrote to). A rebalance (`on_rebalance`, before recovery)
drops the keys of every partition the worker is no longer active for, and
nothing of a partition it does not own is kept afterwards (a standby's events, a
write that lost the race with a rebalance).

The store is registered for the URL scheme `omnimemory://` through Faust's
`faust.stores` entry point; make_app uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from faust.stores import memory
from faust.types import TP, EventT, TableT

log = logging.getLogger(__name__)

SCHEME = "omnimemory"


class Store(memory.Store):
    """Faust's memory store of one table, keeping only its owned partitions' keys."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._owned: set[int] = set()  # changelog partitions this worker is active for
        self._partitions: dict[Any, int] = {}  # key -> its changelog partition

    def write(self, partition: int, key: Any, value: Any) -> None:
        """Set `key` (None: delete it) as written to `partition` of the changelog; not
        kept when this worker does not own that partition."""
        if value is None or partition not in self._owned:
            self.data.pop(key, None)
            self._partitions.pop(key, None)
        else:
            self.data[key] = value
            self._partitions[key] = partition

    def owns(self, partition: int) -> bool:
        return partition in self._owned

    def _clear(self) -> None:
        super()._clear()
        self._partitions.clear()

    def own(self, partitions: Iterable[int]) -> None:
        """Own just these changelog partitions: every other partition's keys leave."""
        self._owned = set(partitions)
        left = [(key, p) for key, p in self._partitions.items() if p not in self._owned]
        for key, partition in left:
            self.write(partition, key, None)
        if left:
            log.info(
                "table %s: %d keys of partitions %s dropped (no longer owned)",
                self.table_name, len(left), sorted({p for _, p in left}),
            )  # fmt: skip

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Apply recovered changelog events in order (a tombstone deletes)."""
        for event in batch:
            value = None if event.message.value is None else to_value(event.value)
            self.write(event.message.partition, to_key(event.key), value)

    async def on_rebalance(
        self,
        assigned: set[TP],
        revoked: set[TP],
        newly_assigned: set[TP],
        generation_id: int = 0,
    ) -> None:
        """Own the changelog partitions assigned as actives (not standbys) before the
        tables recover them."""
        topic = self.table.changelog_topic.get_topic_name()
        standbys = self.app.assignor.assigned_standbys()
        self.own(tp.partition for tp in assigned if tp.topic == topic and tp not in standbys)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Nothing left to drop: `on_rebalance` did before recovery began."""


def write(table: TableT, partition: int, key: bytes, value: bytes | None) -> None:
    """Set (None: delete) a key in the table's memory as written to `partition` of
    its changelog: the one way the router's code changes a table's data."""
    store_of(table).write(partition, key, value)


def owns(table: TableT, partition: int) -> bool:
    """Whether this worker is active for `partition` of the table's changelog."""
    return store_of(table).owns(partition)


def store_of(table: TableT) -> Store:
    store = table.data
    if not isinstance(store, Store):
        raise TypeError(f"table {table} is not kept in an {SCHEME}:// store")
    return store
