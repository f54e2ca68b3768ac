"""The model worker's agent on a batch, run without a broker: its body is driven
with a stream of fake events, and what it sends is recorded. An assignment whose
response or outcome cannot be written is a dead letter before the model is paid,
and a rebalance does not wait out slow model calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import faust
import faust.topics
import pytest

from schemas import Assignment, ModelResponse, Outcome
from workers.config import Settings
from workers.stream.model_worker import Answer, build_model_worker_app

MOMENT = datetime(2026, 1, 1, tzinfo=UTC)


def raw_assignment(**fields: Any) -> bytes:
    base = {
        "query_id": "q1", "text": "t", "model": "m", "pool": "default", "window_id": "w",
        "window_start": MOMENT.isoformat(), "window_end": MOMENT.isoformat(),
        "predicted_quality": 0.5, "predicted_cost_usd": 0.001,
    }  # fmt: skip
    return json.dumps({**base, **fields}).encode()


class FakeMessage:
    def __init__(self, value: bytes, offset: int) -> None:
        self.value, self.key, self.offset = value, b"k", offset
        self.topic, self.partition, self.generation_id = "omnirouter.route.m", 0, 1
        self.acked, self.refcount = False, 0

    def incref(self) -> None:
        self.refcount += 1


class FakeEvent:
    """An event whose acknowledgement makes its offset committable, as Faust's does."""

    def __init__(self, value: bytes, offset: int) -> None:
        self.message = FakeMessage(value, offset)
        self.committable = False

    def ack(self) -> None:
        self.message.refcount -= 1
        if self.message.refcount == 0 and not self.message.acked:
            self.message.acked = True
            self.committable = True


class OneBatch:
    def __init__(self, events: list[FakeEvent]) -> None:
        self.events = events

    async def take_events(self, n: int, within: float) -> AsyncIterator[list[FakeEvent]]:
        yield self.events


class Answerer:
    """Answers "4"; with `hold`, each call waits until cancelled (a slow model)."""

    def __init__(self, hold: bool = False) -> None:
        self.hold, self.asked = hold, 0
        self.called = asyncio.Event()

    async def answer(self, assignments: Sequence[Assignment]) -> list[Answer]:
        self.asked += len(assignments)
        self.called.set()
        if self.hold:
            await asyncio.Event().wait()
        return [Answer(response="4", cost_usd=0.001) for _ in assignments]

    async def close(self) -> None:
        return None


def run_agent(
    monkeypatch: pytest.MonkeyPatch,
    answerer: Answerer,
    values: Sequence[bytes],
    during: Callable[[faust.App], Awaitable[None]] | None = None,
    **settings: Any,
) -> tuple[list[tuple[str, bytes]], list[FakeEvent]]:
    """Run the agent's body over one batch of `values`; what it sent, by topic."""
    sent: list[tuple[str, bytes]] = []

    async def send(topic: Any, value: Any = None, **_: Any) -> asyncio.Future[None]:
        sent.append((topic.get_topic_name(), value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    monkeypatch.setattr(faust.topics.Topic, "send", send)
    config = Settings(router_models=["m"], kafka_partitions=1, **settings)
    app = build_model_worker_app("test", config, "localhost:1", answerer)
    (agent,) = app.agents.values()
    events = [FakeEvent(v, offset) for offset, v in enumerate(values)]

    async def main() -> None:
        body = asyncio.ensure_future(agent.fun(OneBatch(events)))
        if during is not None:
            await during(app)
        # A deadline, not a hang: a batch held through a rebalance never ends here.
        await asyncio.wait_for(body, timeout=30.0)

    asyncio.run(main())
    return sent, events


@pytest.mark.parametrize(
    "fields",
    [{"query_id": ""}, {"query_id": "x" * 201}, {"model": "m" * 201}],
    ids=["empty query_id", "201-char query_id", "201-char model"],
)
def test_an_assignment_its_outcome_cannot_hold_is_a_dead_letter_before_the_call(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any]
) -> None:
    """The outcome's ids hold 1 to 200 characters: building it failed after the
    batch was paid for, and the worker stopped on that batch at every start."""
    answerer = Answerer()
    sent, events = run_agent(
        monkeypatch, answerer, [raw_assignment(query_id="ok"), raw_assignment(**fields)]
    )
    assert [topic for topic, _ in sent].count("omnirouter.deadletter") == 1
    outcomes = [Outcome.model_validate_json(v) for t, v in sent if t == "omnirouter.outcomes"]
    responses = [
        ModelResponse.model_validate_json(v) for t, v in sent if t == "omnirouter.responses"
    ]
    assert [o.query_id for o in outcomes] == [r.query_id for r in responses] == ["ok"]
    assert answerer.asked == 1
    assert all(event.committable for event in events)


def test_a_lone_surrogate_in_metadata_is_a_dead_letter_before_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = raw_assignment()[:-1] + b', "metadata": {"k": "\\ud800"}}'
    answerer = Answerer()
    sent, _ = run_agent(monkeypatch, answerer, [bad])
    assert [topic for topic, _ in sent] == ["omnirouter.deadletter"]
    assert answerer.asked == 0


def test_a_rebalance_hands_a_batch_of_slow_calls_over_unanswered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebalance begins while the model is slow. Faust's revocation waits for the
    batch in hand; a member holding it past the group's rebalance timeout was put
    out of the group while another answered the same assignments again (two final
    answers). Within half the timeout the calls are cancelled and the batch is
    handed over: nothing published, no offset committable, revocation goes on."""
    answerer = Answerer(hold=True)

    async def rebalance_during_the_call(app: faust.App) -> None:
        await answerer.called.wait()
        app.rebalancing = True  # as Faust's on_rebalance_start does

    sent, events = run_agent(
        monkeypatch, answerer, [raw_assignment()], rebalance_during_the_call,
        router_window_seconds=0.2, router_solver_time_limit_seconds=0.1,
        kafka_rebalance_timeout_seconds=1.0,
    )  # fmt: skip
    assert sent == []
    assert not any(event.committable for event in events)
    assert all(event.message.acked for event in events)  # let go: revocation goes on


def test_without_a_rebalance_a_slow_batch_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    sent, events = run_agent(monkeypatch, Answerer(), [raw_assignment()])
    assert [topic for topic, _ in sent] == ["omnirouter.outcomes", "omnirouter.responses"]
    assert all(event.committable for event in events)


def test_a_replayed_model_without_a_recorded_outcome_answers_with_an_error(
    tmp_path: Any,
) -> None:
    """Its response had neither an answer nor an error."""
    from workers.routing.dataset import load_routerbench
    from workers.stream.replay_worker import NOT_RECORDED, ReplayAnswerer

    row = {"sample_id": "s1", "prompt": "2+2?", "outcomes": {
        "a": {"score": 1.0, "cost": 0.001, "response": "4"},
        "b": {"score": None, "cost": None, "response": None}}}  # fmt: skip
    path = tmp_path / "rb.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assignment = Assignment.model_validate_json(raw_assignment(text="2+2?", model="b"))
    (answer,) = asyncio.run(ReplayAnswerer(load_routerbench(path), 0).answer([assignment]))
    _, response = answer.events(assignment, 2000)
    assert (response.response, response.error) == (None, NOT_RECORDED)
