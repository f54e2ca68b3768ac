"""`omnirouter judge openai` as a real process on a real broker, against a local
OpenAI-compatible server scripted per question: a good reply, nonsense, a score
off the scale, HTTP 429 once, a reply slower than the timeout."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from schemas import DeadLetter, ModelResponse, Outcome
from tests.chat_server import ChatServer, completion
from workers.config import ModelPrice, Settings
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.services import LocalBroker, free_port
from workers.stream.judge import is_sampled
from workers.stream.judge_openai import ChatJudge
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

SECRET = "sk-judge-do-not-log-5151"
MODELS = ["small", "large"]
PRICE = {"input_per_mtok_usd": 2.0, "output_per_mtok_usd": 6.0}
CALL_COST = (40 * 2.0 + 10 * 6.0) / 1e6  # the server's usage: 40 prompt, 10 completion tokens
TIMEOUT_SECONDS, SLOW_SECONDS = 1.0, 4.0


class Script:
    """The judge API's behaviour per question (each question's text names its case)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def __call__(self, body: dict[str, Any]) -> web.StreamResponse:
        prompt = body["messages"][-1]["content"]
        case = next(c for c in CASES if f"private question {c}" in prompt)
        self.calls[case] += 1
        if case == "rate-limited" and self.calls[case] == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        if case == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        return completion(CASES[case])


# The judge's reply to each question, and the score it must end as (None: none).
CASES = {
    "good": "The answer names the right capital.\nScore: 8",
    "decimal": "Mostly right.\nScore: 6.5/10",
    "nonsense": "What a lovely day it is; I prefer not to say.",
    "off-scale": "Score: 42",
    "rate-limited": "Partly right.\nScore: 3",
    "slow": "Score: 9",
}
EXPECTED = {"good": 0.8, "decimal": 0.65, "rate-limited": 0.3}
COST_ONLY = {"nonsense", "off-scale"}  # answered and paid for, no score read


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def judge_api(script: Script) -> Iterator[ChatServer]:
    with ChatServer(script) as server:
        yield server


def response(case: str, model: str, **fields: Any) -> ModelResponse:
    values: dict[str, Any] = {
        "query_id": f"q-{case}",
        "model": model,
        "pool": "default",
        "response": f"private answer {case}",
        "text": f"private question {case}",
        **fields,
    }
    return ModelResponse(**values)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(sample name, its result label or "") -> value, summed over the other labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            totals[(sample.name, sample.labels.get("result", ""))] += sample.value
    return totals


def poll(read: Callable[[], Any], done: Callable[[Any], bool], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = read()
        except OSError:  # the metrics server is not up yet
            value = None
        if value is not None and done(value):
            return value
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        time.sleep(0.3)


def test_the_judge_publishes_exactly_the_scores_it_can_read(
    judge_api: ChatServer, script: Script, tmp_path: Path
) -> None:
    settings = Settings(router_models=MODELS, kafka_partitions=2)
    names = settings.topic_names()
    metrics_port = free_port()
    judged = [response(case, MODELS[i % 2]) for i, case in enumerate(CASES)]
    skipped = [
        response("error", "large", response=None, error="HTTP 500 from the model API"),
        response("empty", "small", response=""),
    ]
    messages: list[tuple[str, str | bytes]] = [
        (r.query_id, r.model_dump_json()) for r in [*judged, *skipped]
    ]
    messages.insert(3, ("garbage", b'{"query_id": "q-garbage", "model":'))
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        env = {
            **os.environ,
            "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ROUTER_MODELS": json.dumps(MODELS),
            "KAFKA_PARTITIONS": "2",
            "METRICS_PORT": str(metrics_port),
            "JUDGE_SAMPLE_SHARE": "1",
            "JUDGE_BASE_URL": judge_api.base_url,
            "JUDGE_MODEL": "judge-upstream",
            "JUDGE_API_KEY": SECRET,
            "JUDGE_PRICE": json.dumps(PRICE),
            "JUDGE_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
            "JUDGE_MAX_RETRIES": "1",
        }
        log_path = tmp_path / "judge.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "judge", "openai", "--loglevel", "debug"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                asyncio.run(produce_values(bootstrap, names["responses"], messages))
                # Every response read and counted (the slow one last, after its retry).
                metrics = poll(
                    lambda: scrape(metrics_port),
                    lambda m: (
                        sum(v for (n, _), v in m.items() if n == "omnirouter_judge_verdicts_total")
                        >= len(judged) + len(skipped)
                    ),
                    45,
                    "every response judged or skipped",
                )
                outcomes = [
                    Outcome.model_validate_json(raw)
                    for raw in asyncio.run(read_topic(bootstrap, names["outcomes"]))
                ]
                letters = [
                    DeadLetter.model_validate_json(raw)
                    for raw in asyncio.run(read_topic(bootstrap, names["deadletter"]))
                ]
                assert worker.poll() is None, "the judge died"
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=20)

    by_case = {o.query_id.removeprefix("q-"): o for o in outcomes}
    assert len(outcomes) == len(by_case)  # one outcome per response at most
    scored = {case: o.quality_score for case, o in by_case.items() if o.quality_score is not None}
    assert scored == pytest.approx(EXPECTED)  # no other score, and no wrong one
    assert set(by_case) == set(EXPECTED) | COST_ONLY  # not the slow one, nor the skipped
    for case, outcome in by_case.items():
        assert outcome.source == "judge", case
        assert outcome.judge_cost_usd == pytest.approx(CALL_COST), case
        assert (outcome.cost_usd, outcome.error, outcome.text) == (None, None, None), case
        assert outcome.model == next(r.model for r in judged if r.query_id == outcome.query_id)

    # The 429 was retried once by the client; the slow question timed out twice.
    assert script.calls["rate-limited"] == 2
    assert script.calls["slow"] == 2
    assert "error" not in script.calls and "empty" not in script.calls
    assert {r["model"] for r in judge_api.requests} == {"judge-upstream"}
    assert judge_api.authorizations == {f"Bearer {SECRET}"}

    assert [letter.source_offset >= 0 for letter in letters] == [True]
    assert letters[0].source_topic == names["responses"]

    verdicts = {r: v for (n, r), v in metrics.items() if n == "omnirouter_judge_verdicts_total"}
    assert verdicts == {
        "scored": len(EXPECTED),
        "no_score": len(CASES) - len(EXPECTED),
        "skipped_error": len(skipped),
    }
    assert metrics[("omnirouter_judge_score_total", "")] == pytest.approx(sum(EXPECTED.values()))
    paid = len(EXPECTED) + len(COST_ONLY)
    assert metrics[("omnirouter_judge_spend_usd_total", "")] == pytest.approx(paid * CALL_COST)

    assert worker.returncode == 0  # SIGTERM: a clean stop
    log_text = log_path.read_text(errors="replace")
    assert SECRET not in log_text
    assert "private question" not in log_text and "private answer" not in log_text
    assert "q-slow" in log_text and "timed out calling the judge API" in log_text


async def test_the_chat_judge_prices_each_call_and_sends_the_rubric(
    judge_api: ChatServer, script: Script
) -> None:
    settings = Settings(
        judge_base_url=judge_api.base_url,
        judge_price=ModelPrice(**PRICE),
        judge_rubric="Question <{question}> Answer <{answer}> Score: N from 0 to 10",
        judge_max_retries=0,
    )
    judge = ChatJudge(settings)
    try:
        verdicts = await judge.score([response("good", "small"), response("rate-limited", "large")])
    finally:
        await judge.close()
    assert verdicts[0].score == pytest.approx(0.8)
    assert verdicts[0].cost_usd == pytest.approx(CALL_COST)
    # No retries allowed: the 429 is the verdict, without a score or a cost.
    assert (verdicts[1].score, verdicts[1].cost_usd) == (None, None)
    assert verdicts[1].error == "HTTP 429 from the judge API"
    prompts = sorted(r["messages"][-1]["content"] for r in judge_api.requests)
    assert prompts[0] == "Question <private question good> Answer <private answer good> " + (
        "Score: N from 0 to 10"
    )
    assert {r["temperature"] for r in judge_api.requests} == {0}


def test_the_replay_judge_scores_its_sample_with_the_recorded_scores(tmp_path: Path) -> None:
    table = load_routerbench(shipped_sample_path())
    settings = Settings(kafka_partitions=2)
    names = settings.topic_names()
    answers = [
        ModelResponse(
            query_id=f"r-{row}", model=model, pool="default", response="x", text=table.prompts[row]
        )
        for row in range(20)
        for model in table.models[:3]
    ]
    sampled = [a for a in answers if is_sampled(a, 0.5)]
    scores = {
        (a.query_id, a.model): float(table.scores[int(a.query_id[2:]), table.models.index(a.model)])
        for a in sampled
    }
    recorded = {key: score for key, score in scores.items() if not math.isnan(score)}
    metrics_port = free_port()
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        env = {
            **os.environ,
            "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_PARTITIONS": "2",
            "METRICS_PORT": str(metrics_port),
            "JUDGE_SAMPLE_SHARE": "0.5",
        }
        with open(tmp_path / "judge.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "judge", "replay"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                asyncio.run(
                    produce_values(
                        bootstrap,
                        names["responses"],
                        [(a.query_id, a.model_dump_json()) for a in answers],
                    )
                )
                poll(
                    lambda: scrape(metrics_port),
                    lambda m: (
                        sum(v for (n, _), v in m.items() if n == "omnirouter_judge_verdicts_total")
                        >= len(answers)
                    ),
                    30,
                    "every response judged or skipped",
                )
                outcomes = [
                    Outcome.model_validate_json(raw)
                    for raw in asyncio.run(read_topic(bootstrap, names["outcomes"]))
                ]
                assert worker.poll() is None, "the judge died"
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=20)

    assert 0 < len(sampled) < len(answers)
    assert {(o.query_id, o.model): o.quality_score for o in outcomes} == recorded
    assert len(outcomes) == len(recorded)
    assert {(o.source, o.judge_cost_usd) for o in outcomes} == {("judge", 0.0)}
    assert worker.returncode == 0


async def test_a_reply_that_is_no_completion_costs_its_verdict_not_the_batch() -> None:
    """A proxy's HTML page with status 200 reaches the openai client as a str: its
    usage was read from it, the AttributeError failed the whole gather, and the
    batch's other verdicts were lost."""

    async def html_for_one(body: dict[str, Any]) -> web.StreamResponse:
        if "private question nonsense" in body["messages"][-1]["content"]:
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        return completion(CASES["good"])

    with ChatServer(html_for_one) as server:
        judge = ChatJudge(Settings(judge_base_url=server.base_url, judge_max_retries=0))
        try:
            verdicts = await judge.score([response("nonsense", "small"), response("good", "small")])
        finally:
            await judge.close()
    assert verdicts[0].score is None and verdicts[0].error
    assert verdicts[1].score == pytest.approx(0.8)


async def test_odd_replies_to_the_judge_are_read_as_the_model_worker_reads_them() -> None:
    """The judge reads replies as the model worker does (workers/stream/chat_api.py):
    before, content sent as a list of text parts failed the verdict (AttributeError)
    and a negative token count was priced as a negative spend."""

    async def odd(body: dict[str, Any]) -> web.StreamResponse:
        prompt = body["messages"][-1]["content"]
        if "private question good" in prompt:
            content: Any = [{"type": "text", "text": "Right.\n"}, {"text": "Score: 8"}]
            usage = {"prompt_tokens": 40, "completion_tokens": 10}
        else:
            content, usage = "Score: 3", {"prompt_tokens": -40, "completion_tokens": 10}
        return web.json_response({"choices": [{"message": {"content": content}}], "usage": usage})

    with ChatServer(odd) as server:
        settings = Settings(judge_base_url=server.base_url, judge_price=ModelPrice(**PRICE))
        judge = ChatJudge(settings)
        try:
            parts, negative = await judge.score(
                [response("good", "small"), response("decimal", "small")]
            )
        finally:
            await judge.close()
    assert (parts.score, parts.error) == (pytest.approx(0.8), None)
    assert parts.cost_usd == pytest.approx(CALL_COST)
    assert (negative.score, negative.cost_usd) == (pytest.approx(0.3), None)  # unknown, not < 0
