"""The OpenAI-compatible worker against a small local server that speaks /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from schemas import Assignment, ModelResponse, Outcome
from tests.chat_server import ChatServer, completion
from tests.faults import poll_until, start_worker
from workers.config import Settings
from workers.services import LocalBroker
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

SECRET = "sk-test-do-not-log-4242"
MODELS = ["vendor/small", "large"]


async def reverse_or_fail(body: dict[str, Any]) -> web.StreamResponse:
    """Answers every prompt with its reversal; 500 for prompts holding FAIL."""
    prompt = body["messages"][-1]["content"]
    if "FAIL" in prompt:
        return web.Response(status=500, text="upstream exploded")
    return completion(prompt[::-1])


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    with ChatServer(reverse_or_fail) as server:
        yield server


def assignment(query_id: str, model: str, text: str) -> Assignment:
    now = datetime.now(UTC)
    return Assignment(
        query_id=query_id, text=text, model=model, pool="default", window_id="w",
        window_start=now, window_end=now, predicted_quality=0.5, predicted_cost_usd=0.0,
    )  # fmt: skip


def test_answers_usage_and_errors_are_published(chat_server: ChatServer, tmp_path: Path) -> None:
    prices = {"large": {"input_per_mtok_usd": 10.0, "output_per_mtok_usd": 30.0}}
    settings = Settings(router_models=MODELS, kafka_partitions=2)
    names = settings.topic_names()
    with LocalBroker() as broker:
        asyncio.run(create_topics(settings, broker.bootstrap_servers))
        env = {
            **os.environ,
            "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "ROUTER_MODELS": json.dumps(MODELS),
            "ROUTER_MODEL_PRICES": json.dumps(prices),
            "KAFKA_PARTITIONS": "2",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{chat_server.port}/v1",
            "OPENAI_API_KEY": SECRET,
            "OPENAI_MODEL_MAP": json.dumps({"vendor/small": "small-upstream"}),
            "OPENAI_MAX_RETRIES": "1",
        }
        log_path = tmp_path / "openai.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "model-worker", "openai"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                routed = [
                    assignment("q1", "large", "private prompt one"),
                    assignment("q2", "vendor/small", "private prompt two"),
                    assignment("q3", "large", "please FAIL"),
                ]
                for a in routed:
                    asyncio.run(
                        produce_values(broker.bootstrap_servers, names[f"route:{a.model}"],
                                       [(a.query_id, a.model_dump_json())])
                    )  # fmt: skip
                deadline = time.monotonic() + 60
                outcomes: list[Outcome] = []
                while len(outcomes) < len(routed) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    raw = asyncio.run(read_topic(broker.bootstrap_servers, names["outcomes"]))
                    outcomes = [Outcome.model_validate_json(r) for r in raw]
                responses = [
                    ModelResponse.model_validate_json(r)
                    for r in asyncio.run(read_topic(broker.bootstrap_servers, names["responses"]))
                ]
            finally:
                worker.terminate()
                worker.wait(timeout=20)

    by_id = {o.query_id: o for o in outcomes}
    assert set(by_id) == {"q1", "q2", "q3"}
    assert (by_id["q1"].input_tokens, by_id["q1"].output_tokens) == (40, 10)
    assert by_id["q1"].cost_usd == pytest.approx((40 * 10 + 10 * 30) / 1e6)
    assert by_id["q2"].cost_usd is None  # no price configured: unknown, not free
    assert by_id["q3"].error == "HTTP 500 from the model API"
    assert by_id["q1"].quality_score is None  # quality comes later, as feedback
    answers = {r.query_id: r.response for r in responses}
    assert answers["q1"] == "private prompt one"[::-1]
    assert answers["q3"] is None
    upstream_models = sorted(str(r["model"]) for r in chat_server.requests)
    assert upstream_models == ["large", "large", "large", "small-upstream"]  # q3 retried once
    assert chat_server.authorizations == {f"Bearer {SECRET}"}
    log_text = log_path.read_text(errors="replace")
    assert SECRET not in log_text
    assert "private prompt" not in log_text
    assert worker.returncode == 0  # SIGTERM: a clean stop


ODD_REPLIES: dict[str, Any] = {
    "null-choices": {"choices": None},
    "a-list": [{"message": {"content": "hi"}}],
    "content-parts": {
        "choices": [{"message": {"content": [{"type": "text", "text": "ab"}, {"text": "c"}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    },
    "negative-usage": {
        "choices": [{"message": {"content": "ok"}}],
        "usage": {"prompt_tokens": -1, "completion_tokens": 2},
    },
    "no-usage": {"choices": [{"message": {"content": "ok"}}]},
    "no-choices": {"usage": {"prompt_tokens": 5, "completion_tokens": 0}},
    # Paid for, but no text (a refusal or a tool call): its usage still counts.
    "null-content": {
        "choices": [{"message": {"content": None}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    },
    "html": "<html>bad gateway</html>",  # a proxy's page, with status 200
    "broken-json": '{"choices": [',  # announced as JSON, cut short
    "nested-too-deeply": "[" * 100_000 + "]" * 100_000,  # json.loads: RecursionError
}


async def odd(body: dict[str, Any]) -> web.StreamResponse:
    """Replies shaped as some servers (or a broken proxy) send them."""
    kind = body["messages"][-1]["content"]
    if kind == "html":
        return web.Response(text=ODD_REPLIES[kind], content_type="text/html")
    if kind in ("broken-json", "nested-too-deeply"):
        return web.Response(text=ODD_REPLIES[kind], content_type="application/json")
    return web.json_response(ODD_REPLIES[kind])


def test_odd_replies_are_answers_or_errors_never_a_crash() -> None:
    """Each odd reply is an answer or an error: before, a null `choices` or a JSON
    list raised TypeError and a list of content parts or a negative token count
    failed the Outcome, each stopping the worker with its batch; so did a body
    nested too deeply to parse (a RecursionError, no ValueError, escaped `ask`)."""
    from workers.stream.openai_worker import ChatAnswerer

    async def answers(base_url: str) -> dict[str, Any]:
        dollar_a_token = {"input_per_mtok_usd": 1e6, "output_per_mtok_usd": 1e6}
        settings = Settings(
            router_models=MODELS,
            openai_base_url=base_url,
            router_model_prices={"large": dollar_a_token},
        )
        answerer = ChatAnswerer(settings)
        try:
            return {
                kind: await answerer.answer_one(assignment(kind, "large", kind))
                for kind in ODD_REPLIES
            }
        finally:
            await answerer.close()

    with ChatServer(odd) as server:
        got = asyncio.run(answers(server.base_url))
    assert got["null-choices"].response is None and got["null-choices"].error
    assert got["a-list"].response is None and got["a-list"].error
    assert got["content-parts"].response == "abc" and got["content-parts"].input_tokens == 3
    assert got["negative-usage"].response == "ok"
    assert got["negative-usage"].input_tokens is None and got["negative-usage"].output_tokens == 2
    assert (got["no-usage"].response, got["no-usage"].error) == ("ok", None)
    assert got["no-usage"].input_tokens is None and got["no-usage"].cost_usd is None
    for kind in ("no-choices", "null-content", "html", "broken-json", "nested-too-deeply"):
        assert got[kind].response is None and got[kind].error, kind
    assert (got["no-choices"].input_tokens, got["no-choices"].output_tokens) == (5, 0)
    assert (got["null-content"].input_tokens, got["null-content"].output_tokens) == (7, 3)
    assert got["null-content"].cost_usd == pytest.approx(10.0)


def answer_all(settings: Settings, prompts: list[str]) -> list[Any]:
    """The answers of one ChatAnswerer to `prompts` (on model "large"), all at once."""
    from workers.stream.openai_worker import ChatAnswerer

    async def run() -> list[Any]:
        answerer = ChatAnswerer(settings)
        try:
            return await answerer.answer([assignment(p, "large", p) for p in prompts])
        finally:
            await answerer.close()

    return asyncio.run(run())


def test_rate_limits_and_server_errors_are_retried_by_the_client() -> None:
    """HTTP 429 and 503 once, then an answer: the answer, after one retry each
    (before: the first 429 or 503 was the assignment's error)."""
    calls: dict[str, int] = {}

    async def flaky(body: dict[str, Any]) -> web.StreamResponse:
        prompt = body["messages"][-1]["content"]
        calls[prompt] = calls.get(prompt, 0) + 1
        if calls[prompt] == 1 and prompt != "fine":
            status = 429 if prompt == "rate-limited" else 503
            return web.json_response({"error": {"message": "later"}}, status=status)
        return completion(prompt[::-1])

    prompts = ["rate-limited", "unavailable", "fine"]
    with ChatServer(flaky) as server:
        retried = answer_all(
            Settings(router_models=MODELS, openai_base_url=server.base_url, openai_max_retries=1),
            prompts,
        )
        assert calls == {"rate-limited": 2, "unavailable": 2, "fine": 1}
        calls.clear()
        unretried = answer_all(
            Settings(router_models=MODELS, openai_base_url=server.base_url, openai_max_retries=0),
            prompts,
        )
    assert [(a.response, a.error) for a in retried] == [(p[::-1], None) for p in prompts]
    assert [a.error for a in unretried] == [
        "HTTP 429 from the model API",
        "HTTP 503 from the model API",
        None,
    ]


def test_a_reply_slower_than_the_timeout_is_an_error() -> None:
    async def slow(body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(3)
        return completion("late")

    with ChatServer(slow) as server:
        settings = Settings(
            router_models=MODELS,
            openai_base_url=server.base_url,
            openai_timeout_seconds=0.5,
            openai_max_retries=0,
        )
        started = time.monotonic()
        (answer,) = answer_all(settings, ["slow"])
        elapsed = time.monotonic() - started
    assert (answer.response, answer.error) == (None, "timed out calling the model API")
    assert elapsed < 2.5


def test_calls_in_flight_stay_within_the_limit_and_prompts_are_logged_only_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    in_flight = {"now": 0, "most": 0}

    async def busy(body: dict[str, Any]) -> web.StreamResponse:
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        await asyncio.sleep(0.2)
        in_flight["now"] -= 1
        return completion("ok")

    prompts = [f"private prompt {i}" for i in range(6)]
    with ChatServer(busy) as server, caplog.at_level("INFO"):
        base = Settings(router_models=MODELS, openai_base_url=server.base_url)
        quiet = answer_all(base.model_copy(update={"openai_max_concurrency": 2}), prompts)
        assert in_flight["most"] == 2
        assert "private prompt" not in caplog.text
        answer_all(base.model_copy(update={"openai_log_prompts": True}), prompts[:1])
    assert [a.response for a in quiet] == ["ok"] * len(prompts)
    assert "private prompt 0" in caplog.text


def test_an_answer_too_large_to_publish_is_an_error_not_a_stopped_worker(tmp_path: Path) -> None:
    """An answer larger than a produce request (a model looping to its output limit)
    is its query's error, with its usage; the worker goes on with the rest. Before,
    its response failed to publish (MessageSizeTooLargeError) after the batch's
    outcomes were out: the worker stopped, and at every restart called the model
    again for the same batch and stopped again, the batch's other answers never
    published."""
    huge = "all work and no play. " * 60_000  # 1.3 MB

    async def verbose(body: dict[str, Any]) -> web.StreamResponse:
        prompt = body["messages"][-1]["content"]
        return completion(huge if prompt == "loop" else prompt[::-1], 10, 300_000)

    settings = Settings(router_models=MODELS, kafka_partitions=1)
    names = settings.topic_names()
    with ChatServer(verbose) as server, LocalBroker() as broker:
        asyncio.run(create_topics(settings, broker.bootstrap_servers))
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "ROUTER_MODELS": json.dumps(MODELS),
            "KAFKA_PARTITIONS": "1",
            "OPENAI_BASE_URL": server.base_url,
        }
        worker = start_worker("model-worker openai", env, tmp_path / "openai.log")
        try:
            routed = [assignment("q1", "large", "loop"), assignment("q2", "large", "short")]
            asyncio.run(
                produce_values(broker.bootstrap_servers, names["route:large"],
                               [(a.query_id, a.model_dump_json()) for a in routed])
            )  # fmt: skip

            def answered() -> list[ModelResponse]:
                raw = asyncio.run(read_topic(broker.bootstrap_servers, names["responses"]))
                return [ModelResponse.model_validate_json(r) for r in raw]

            poll_until(lambda: len(answered()) >= 2 or worker.poll() is not None, 45)
            responses = answered()
            outcomes = [
                Outcome.model_validate_json(r)
                for r in asyncio.run(read_topic(broker.bootstrap_servers, names["outcomes"]))
            ]
            still_running = worker.poll() is None
        finally:
            worker.terminate()
            worker.wait(timeout=20)

    assert still_running, (tmp_path / "openai.log").read_text(errors="replace")[-3000:]
    by_id = {r.query_id: r for r in responses}
    assert set(by_id) == {"q1", "q2"}
    assert by_id["q2"].response == "trohs"
    assert by_id["q1"].response is None and by_id["q1"].error
    errors = {o.query_id: o.error for o in outcomes}
    assert errors["q1"] and errors["q2"] is None
    assert {o.output_tokens for o in outcomes if o.query_id == "q1"} == {300_000}
