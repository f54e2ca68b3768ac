"""How a chat completion's reply is read (workers/stream/chat_api.py), without a server."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from schemas import Assignment
from workers.config import ModelPrice, Settings
from workers.stream.chat_api import read_reply
from workers.stream.codec import encode
from workers.stream.model_worker import Answer
from workers.stream.outcomes import validate_outcome

PRICE = ModelPrice(input_per_mtok_usd=10.0, output_per_mtok_usd=30.0)


def completion(content: Any, usage: Any = None) -> SimpleNamespace:
    """What the client returns: it builds replies without validating them."""
    message = SimpleNamespace(content=content)
    return SimpleNamespace(choices=[SimpleNamespace(message=message)], usage=usage)


@pytest.mark.parametrize(
    "garbage",
    [2**32 - 1, 2**64 - 1, 10**400],  # -1 as an unsigned 32- or 64-bit count; absurd
    ids=["uint32 -1", "uint64 -1", "10**400"],
)
def test_a_token_count_no_call_can_have_is_not_a_count(garbage: int) -> None:
    """A count beyond the outcomes table's 32-bit columns (a server's -1 read as
    unsigned) made the outcome a dead letter at the writer, the answer's usage,
    cost and error lost with it; one beyond a float's range raised OverflowError
    pricing it, which stopped the worker with its batch at every start."""
    reply = read_reply(completion("ok", {"prompt_tokens": garbage, "completion_tokens": 12}))
    assert (reply.text, reply.input_tokens, reply.output_tokens) == ("ok", None, 12)
    assert reply.cost(PRICE) is None  # unknown, not a fortune
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assignment = Assignment(
        query_id="q", text="t", model="large", pool="default", window_id="w",
        window_start=now, window_end=now, predicted_quality=0.5, predicted_cost_usd=0.1,
    )  # fmt: skip
    answer = Answer(
        response=reply.text,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
        cost_usd=reply.cost(PRICE),
    )
    outcome, _ = answer.events(assignment, 2000)
    stored = validate_outcome(encode(outcome), Settings(router_models=["large"]))
    assert stored.output_tokens == 12


def test_content_parts_without_text_are_no_answer_text() -> None:
    """A list of parts none of which is text (a refusal part; none at all) held no
    answer: before, it was read as the answer "", published as a final answer
    without an error."""
    refusal = [{"type": "refusal", "refusal": "I can't help with that."}]
    assert read_reply(completion(refusal)).text is None
    assert read_reply(completion([])).text is None
    parts = [{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "x"}, {"text": "b"}]
    assert read_reply(completion(parts)).text == "ab"


def test_a_cost_that_overflows_is_unknown_not_a_stopped_worker() -> None:
    """An absurd price (1e303 USD per million tokens) times a long answer overflows to
    inf; since an Outcome holds finite costs only, building its events raised and
    stopped the worker on its batch at every start."""
    absurd = ModelPrice(input_per_mtok_usd=1e303, output_per_mtok_usd=1e303)
    reply = read_reply(completion("ok", {"prompt_tokens": 10, "completion_tokens": 2_000_000}))
    assert reply.cost(absurd) is None
    assert reply.cost(PRICE) == pytest.approx((10 * 10.0 + 2_000_000 * 30.0) / 1e6)
