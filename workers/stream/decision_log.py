"""The router's memory of what it decided: one entry per query id in a Faust table.

A query's outcome is either its assignments or its refusal, never both: an entry
is first the decided assignments (`DECIDED` + a JSON array: one per model asked,
several for a cascade's probes or a shadow answer; a single JSON object in
entries written before), or the refusal (`REFUSED` + the dead letter sent for
it, when its pool's solve failed), written and acknowledged by the broker before
the assignments or the letter are sent, then a published marker (`PUBLISHED` +
"<partition>:<unix time>") once they were sent; in a Kafka transaction, the
marker alone, committed with them. A window read again (a hand-over, a crash
before its records were acknowledged) re-sends a recorded outcome unchanged and
skips a published one, so a refused query is never routed by a later solve that
succeeds, nor dead-lettered twice. The publishers
(workers/stream/publishers.py) write the entries and hand them to `remember`;
this module only shapes and reads them. The table's
changelog is compacted and partitioned like omnirouter.predicted, so the router
that owns a pool's partition recovers its decisions after a restart or a
rebalance; the table holds only the partitions this router owns
(workers/stream/table_store.py: a partition taken away leaves its memory, so
entries it no longer owns are neither read nor forgotten here). Entries older
than the de-duplication horizon are forgotten a few at a time, oldest first,
without scanning the table; queued entries of a partition since taken away are
skipped when their turn comes (they are gone from the table).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from faust.types import TableT
from pydantic import BaseModel, ConfigDict, TypeAdapter

from schemas import Assignment, DeadLetter, PredictedQuery
from workers.stream.table_store import write

PUBLISHED = b"P"  # followed by "<changelog partition>:<unix time>"
DECIDED = b"D"  # followed by the assignments' JSON array
REFUSED = b"R"  # followed by the Refusal's JSON (the dead letter and its key)


def published_marker(partition: int, at: float) -> bytes:
    return PUBLISHED + f"{partition}:{at:.0f}".encode()


def parse_published(value: bytes) -> tuple[int, float] | None:
    """(partition, published at) of a published marker; None for anything else."""
    if not value.startswith(PUBLISHED):
        return None
    try:
        partition, at = value[len(PUBLISHED) :].decode().split(":")
        return int(partition), float(at)
    except ValueError:
        return None


_ASSIGNMENTS = TypeAdapter(list[Assignment])


def decided_value(assignments: Sequence[Assignment]) -> bytes:
    """A decision entry's value: every assignment of one query."""
    return DECIDED + _ASSIGNMENTS.dump_json(list(assignments))


def decided_assignments(value: bytes) -> list[Assignment]:
    """The assignments of a decision entry (a list, or one assignment before lists)."""
    body = value[len(DECIDED) :]
    if body.lstrip().startswith(b"["):
        return _ASSIGNMENTS.validate_json(body)
    return [Assignment.model_validate_json(body)]


class Refusal(BaseModel):
    """A query refused: the dead letter that is its outcome, with the letter's key
    (its source record's), kept so that a replay sends the very same record."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    query_id: str
    key: bytes | None
    letter: DeadLetter


def refused_value(refusal: Refusal) -> bytes:
    """A refusal entry's value."""
    return REFUSED + refusal.model_dump_json().encode()


def refusal_of(value: bytes) -> Refusal:
    return Refusal.model_validate_json(value[len(REFUSED) :])


@dataclass(frozen=True)
class WindowItems:
    """A window's queries of one pool split by what the decision log knows of them."""

    fresh: list[PredictedQuery]  # never decided: to be solved
    resend: list[Assignment]  # decided but maybe never sent: re-sent unchanged
    duplicates: list[str]  # already published, or twice in this window: skipped
    refused: list[Refusal] = field(default_factory=list)  # refused, maybe never sent: the same


def classify(
    predicted: Sequence[PredictedQuery], recorded: Mapping[str, bytes | None]
) -> WindowItems:
    """Split a window by the decision log's entries (query id -> entry or None).
    Pure, so the exactly-once rule reads in one place: a query is decided (or
    refused) once; a recorded decision or refusal is re-sent as it was; a
    published one is never sent again."""
    fresh: list[PredictedQuery] = []
    resend: list[Assignment] = []
    duplicates: list[str] = []
    refused: list[Refusal] = []
    seen: set[str] = set()
    for item in predicted:
        query_id = item.query.query_id
        entry = recorded.get(query_id)
        if query_id in seen or (entry is not None and entry.startswith(PUBLISHED)):
            duplicates.append(query_id)
        elif entry is not None and entry.startswith(DECIDED):
            resend.extend(decided_assignments(entry))
        elif entry is not None and entry.startswith(REFUSED):
            refused.append(refusal_of(entry))
        else:
            fresh.append(item)
        seen.add(query_id)
    return WindowItems(fresh, resend, duplicates, refused)


@dataclass
class DecisionLog:
    """The decisions table, with the few operations the window stage needs."""

    table: TableT
    # (published at, query id) of entries this process published or recovered,
    # oldest first: forgetting pops from the front instead of scanning the table.
    _published: list[tuple[float, bytes]] = field(default_factory=list)

    def recorded(self, query_ids: Iterable[str]) -> dict[str, bytes | None]:
        return {query_id: self.table.data.get(query_id.encode()) for query_id in query_ids}

    @property
    def changelog(self) -> str:
        return str(self.table.changelog_topic.get_topic_name())

    def decided_entries(
        self, assignments: Sequence[Assignment], key_prefix: str = ""
    ) -> list[tuple[bytes, bytes]]:
        """(key, value) of each query's decision (all its assignments), as written to
        the changelog; keyed `key_prefix` + query id (a cascade's escalation decision
        is kept apart from the query's first one)."""
        by_query: dict[str, list[Assignment]] = {}
        for assignment in assignments:
            by_query.setdefault(key_prefix + assignment.query_id, []).append(assignment)
        return [(query_id.encode(), decided_value(group)) for query_id, group in by_query.items()]

    def refused_entries(
        self, refusals: Sequence[Refusal], key_prefix: str = ""
    ) -> list[tuple[bytes, bytes]]:
        """(key, value) of each query's refusal, as written to the changelog."""
        return [((key_prefix + r.query_id).encode(), refused_value(r)) for r in refusals]

    def published_entries(
        self, query_ids: Iterable[str], partition: int, at: float
    ) -> list[tuple[bytes, bytes]]:
        """(key, value) of each published marker, as written to the changelog."""
        marker = published_marker(partition, at)
        return [(query_id.encode(), marker) for query_id in query_ids]

    def remember(self, partition: int, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Take entries the publisher wrote to `partition` of the changelog
        (workers/stream/publishers.py)."""
        for key, value in entries:
            write(self.table, partition, key, value)
            marker = parse_published(value)
            if marker is not None:
                heapq.heappush(self._published, (marker[1], key))

    def track_recovered(self) -> int:
        """After a rebalance, queue the recovered published entries for forgetting
        (one pass over the table per rebalance, not per forgetting round)."""
        tracked = {key for _, key in self._published}
        added = 0
        for key, value in list(self.table.data.items()):
            marker = parse_published(value)
            if marker is not None and key not in tracked:
                heapq.heappush(self._published, (marker[1], key))
                added += 1
        return added

    def forget_before(self, cutoff: float) -> int:
        """Delete entries published before `cutoff`, oldest first, from the table
        and (a tombstone) its compacted changelog."""
        forgotten = 0
        while self._published and self._published[0][0] < cutoff:
            queued_at, key = heapq.heappop(self._published)
            marker = parse_published(self.table.data.get(key, b""))
            if marker is None:
                continue  # gone already, or moved to another router
            if marker[1] >= cutoff:
                if marker[1] != queued_at:  # published again (maybe by another router,
                    # recovered while this stale entry hid it from track_recovered)
                    heapq.heappush(self._published, (marker[1], key))
                continue
            write(self.table, marker[0], key, None)
            self.table.send_changelog(marker[0], key, None)
            forgotten += 1
        return forgotten
