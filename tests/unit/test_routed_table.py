"""The router's decision log: the exactly-once split of a window, and forgetting."""

from __future__ import annotations

from schemas import Assignment, PredictedQuery, QueryEvent
from tests.tables import router_table
from workers.stream.codec import dead_letter, encode
from workers.stream.decision_log import (
    DECIDED,
    PUBLISHED,
    REFUSED,
    DecisionLog,
    Refusal,
    classify,
    decided_value,
    parse_published,
    published_marker,
)
from workers.stream.table_store import write


def predicted(query_id: str) -> PredictedQuery:
    query = QueryEvent(query_id=query_id, text="t")
    return PredictedQuery(query=query, models=["m"], quality=[0.5], cost_usd=[0.1])


def decided(query_id: str, model: str = "m") -> bytes:
    assignment = Assignment(
        query_id=query_id, text="t", model=model, pool="default", window_id="w",
        window_start="2026-01-01T00:00:00Z", window_end="2026-01-01T00:00:01Z",
        predicted_quality=0.5, predicted_cost_usd=0.1,
    )  # fmt: skip
    return DECIDED + encode(assignment)


def test_a_window_splits_into_fresh_resent_and_duplicate_queries() -> None:
    window = [predicted(q) for q in ["new", "decided", "published", "new"]]
    recorded = {"decided": decided("decided", "dear"), "published": published_marker(0, 1.0)}
    split = classify(window, recorded)
    assert [p.query.query_id for p in split.fresh] == ["new"]  # once, though it came twice
    assert [(a.query_id, a.model) for a in split.resend] == [("decided", "dear")]  # unchanged
    assert split.duplicates == ["published", "new"]


def assignment_of(query_id: str, model: str) -> Assignment:
    return Assignment.model_validate_json(decided(query_id, model)[len(DECIDED) :])


def test_every_assignment_of_a_query_is_one_decision_and_resent_together() -> None:
    """A cascade's two probes (or an answer and its shadow) are one decision: a
    restart re-sends both, not the last one written."""
    probes = [assignment_of("q", "cheap"), assignment_of("q", "cheaper")]
    log = DecisionLog(router_table("routed").table)
    entries = log.decided_entries([*probes, assignment_of("r", "dear")])
    assert [key for key, _ in entries] == [b"q", b"r"]
    split = classify([predicted("q")], dict(entries_as_recorded(entries)))
    assert [(a.query_id, a.model) for a in split.resend] == [("q", "cheap"), ("q", "cheaper")]


def entries_as_recorded(entries: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    return {key.decode(): value for key, value in entries}


def test_a_decision_written_before_lists_is_still_read() -> None:
    """Changelogs written before a decision held several assignments hold one object."""
    split = classify([predicted("old")], {"old": decided("old", "dear")})
    assert [(a.query_id, a.model) for a in split.resend] == [("old", "dear")]
    assert decided_value([assignment_of("old", "dear")]).startswith(DECIDED + b"[")


def refusal(query_id: str, key: bytes | None = b"default") -> Refusal:
    letter = dead_letter(encode(predicted(query_id)), "omnirouter.predicted", 0, 7, "no plan")
    return Refusal(query_id=query_id, key=key, letter=letter)


def test_a_refused_query_is_re_sent_its_very_letter_never_solved_again() -> None:
    """A refusal is a query's decision: a window read again re-sends the dead letter
    recorded (same content, same key), and never solves (or routes) the query."""
    log = DecisionLog(router_table("routed").table)
    refused = [refusal("r"), refusal("unkeyed", key=None)]
    entries = log.refused_entries(refused)
    assert [key for key, _ in entries] == [b"r", b"unkeyed"]
    assert all(value.startswith(REFUSED) for _, value in entries)
    window = [predicted(q) for q in ["r", "new", "unkeyed"]]
    split = classify(window, dict(entries_as_recorded(entries)))
    assert [p.query.query_id for p in split.fresh] == ["new"]
    assert split.refused == refused  # the letters as they were, their keys too
    assert split.resend == [] and split.duplicates == []
    published = classify(window[:1], {"r": published_marker(0, 1.0)})
    assert published.duplicates == ["r"] and published.refused == []  # sent: not again


def test_a_refusal_of_an_escalation_is_keyed_apart() -> None:
    log = DecisionLog(router_table("routed").table)
    assert [k for k, _ in log.refused_entries([refusal("q")], "escalation:")] == [b"escalation:q"]


def test_published_markers_read_back() -> None:
    assert parse_published(published_marker(partition=3, at=1_000.0)) == (3, 1_000.0)
    assert parse_published(decided("q")) is None
    assert parse_published(PUBLISHED) is None  # a marker from before markers had a time
    assert parse_published(PUBLISHED + b"x:y") is None


def test_forgetting_deletes_only_entries_published_before_the_cutoff_oldest_first() -> None:
    table = router_table("routed")
    log = DecisionLog(table.table)
    log.remember(1, log.published_entries(["old"], 1, at=100.0))
    log.remember(2, log.published_entries(["young"], 2, at=200.0))
    log.remember(2, [(b"undecided", decided("undecided"))])  # decided, never published: kept
    assert log.forget_before(150.0) == 1
    assert set(table.data) == {b"young", b"undecided"}
    assert table.sent[-1] == (1, b"old", None)  # a tombstone in the entry's partition


def test_recovered_entries_are_forgotten_too() -> None:
    table = router_table("routed")
    write(table.table, 0, b"recovered", published_marker(0, 50.0))  # as recovery leaves them
    write(table.table, 0, b"d", decided("d"))
    log = DecisionLog(table.table)
    assert log.track_recovered() == 1
    assert log.forget_before(60.0) == 1
    assert set(table.data) == {b"d"}


def test_an_entry_published_again_after_its_first_marker_is_kept() -> None:
    table = router_table("routed")
    log = DecisionLog(table.table)
    log.remember(0, log.published_entries(["q"], 0, at=100.0))
    log.remember(0, log.published_entries(["q"], 0, at=300.0))  # routed again (a duplicate)
    assert log.forget_before(200.0) == 0
    assert b"q" in table.data


def test_an_entry_republished_while_this_router_had_lost_its_partition_is_forgotten() -> None:
    """Published here at 100, the partition moved away and came back with the entry
    republished at 200 by its owner meanwhile: the stale queued time hid the recovered
    marker from track_recovered, and the entry was never forgotten."""
    table = router_table("routed", owned=[0])
    log = DecisionLog(table.table)
    log.remember(0, log.published_entries(["k"], 0, at=100.0))
    store = table.table.data
    store.own([])  # the partition moved away
    store.own([0])  # and came back: recovery brings the owner's later marker
    write(table.table, 0, b"k", published_marker(0, 200.0))
    log.track_recovered()
    assert log.forget_before(150.0) == 0  # published at 200: kept
    assert log.forget_before(10_000.0) == 1
    assert b"k" not in table.data
