"""An escalation window through the window publishers (workers/stream/publishers.py):
its decisions keyed "escalation:<query_id>", only escalations sent to the models,
an accepted probe's answer sent as the query's final answer, and its spend taken
from the pool's escalation reserve in the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from schemas import Assignment, ModelResponse, WindowReport
from tests.tables import changelog, router_table
from tests.unit.test_publishers import Plain, RecordingProducer, topic
from workers.config import model_topic
from workers.routing.probes import accepted_metadata, final_response
from workers.stream.app import Topics
from workers.stream.decision_log import DECIDED, PUBLISHED, DecisionLog, decided_assignments
from workers.stream.pool_ledger import PoolAccount, PoolLedger
from workers.stream.publishers import (
    AcknowledgedPublisher,
    PoolWindow,
    StartedOnFirstUse,
    WindowRecords,
)

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def decision(query_id: str, model: str, role: str, **fields: Any) -> Assignment:
    return Assignment.model_validate(
        {
            "query_id": query_id, "text": "t", "model": model, "pool": "c", "window_id": "e",
            "window_start": NOW, "window_end": NOW, "predicted_quality": 0.8,
            "predicted_cost_usd": 2.0 if role == "escalation" else 0.0, "role": role, **fields,
        }
    )  # fmt: skip


def report(spend: float) -> WindowReport:
    return WindowReport(
        window_id="e", pool="c", window_start=NOW, window_end=NOW, query_count=2,
        mode="budget", window_budget_usd=5.0, predicted_spend_usd=spend,
        predicted_mean_quality=0.8, solver="fast", solver_status="near_optimal",
        solve_seconds=0.0, assignments_per_model={"dear": 1}, escalation_queries=1,
        escalation_spend_usd=spend,
    )  # fmt: skip


async def test_an_escalation_window_sends_escalations_and_accepted_finals_once() -> None:
    routed = router_table("routed")
    topics = SimpleNamespace(
        windows=topic("windows"),
        responses=topic("responses"),
    )
    ledger = PoolLedger(router_table("pool_ledger").table)
    billed = PoolAccount(billed_until=NOW, escalation_reserve_usd=5.0)
    ledger.remember(1, *ledger.entry("c", billed))
    decisions = DecisionLog(routed.table)
    records = WindowRecords(cast(Topics, topics), decisions, ledger)
    producer = RecordingProducer()
    publisher = AcknowledgedPublisher(records, cast(StartedOnFirstUse, Plain(producer)))
    accepted = decision("q1", "cheap", "probe", metadata=accepted_metadata({"u": 1}, "42"))
    escalated = decision("q2", "dear", "escalation")
    window = PoolWindow(
        "c", 1, [accepted, escalated], [], report(2.0),
        stage="escalation", finals=[final_response(accepted)],
    )  # fmt: skip

    assert await publisher.publish(window, lambda: True)

    sent = [(t, k) for t, k, _ in producer.sent]
    assert sent[:2] == [
        (changelog("routed"), b"escalation:q1"),
        (changelog("routed"), b"escalation:q2"),
    ]
    assert (model_topic("dear"), b"q2") in sent and (model_topic("cheap"), b"q1") not in sent
    assert ("responses", b"q1") in sent
    assert all(k.startswith(b"escalation:") for t, k in sent if t == changelog("routed"))
    assert routed.data[b"escalation:q1"].startswith(PUBLISHED)
    assert b"q1" not in routed.data  # the query's first decision is another key
    account = ledger.account("c")
    assert account.escalation_reserve_usd == 3.0
    assert account.billed_until == NOW  # escalations bill no production time


def test_an_accepted_decision_re_sent_after_a_restart_gives_the_same_final_answer() -> None:
    accepted = decision("q1", "cheap", "probe", metadata=accepted_metadata({"u": 1}, "42"))
    entries = DecisionLog(router_table("routed").table).decided_entries([accepted], "escalation:")
    ((key, value),) = entries
    assert key == b"escalation:q1" and value.startswith(DECIDED)
    (recovered,) = decided_assignments(value)
    again = final_response(recovered)
    assert again == final_response(accepted)
    assert isinstance(again, ModelResponse) and again.final and again.response == "42"
