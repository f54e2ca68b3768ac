"""The learning loop from an empty store, on a real broker and PostgreSQL: the router
knows only prices, explores, an LLM judge (a local OpenAI-compatible server)
scores the answers, the outcome writer stores the scores, and the router's
predictions move with them, so its routing changes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.orm import Session

from schemas import (
    Assignment,
    ModelResponse,
    PredictedBatch,
    QueryEvent,
    WindowReport,
)
from tests.chat_server import ChatServer, completion
from tests.faults import start_worker, wait_until
from workers.config import Settings
from workers.db.models import OutcomeRow
from workers.services import LocalBroker
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

MODELS = ["dear", "cheap"]
PRICES = {
    "dear": {"input_per_mtok_usd": 30.0, "output_per_mtok_usd": 60.0},
    "cheap": {"input_per_mtok_usd": 0.5, "output_per_mtok_usd": 1.0},
}
EXPLORATION_SHARE = 0.2


async def answer_or_judge(body: dict[str, Any]) -> web.StreamResponse:
    """Model calls answer "<model> says ..."; judge calls score dear's answers 9/10
    and cheap's 2/10 (the judge's prompt holds the answer)."""
    prompt = body["messages"][-1]["content"]
    if body["model"] == "the-judge":
        score = 9 if "dear says" in prompt else 2
        return completion(f"The answer is checked.\nScore: {score}")
    return completion(f"{body['model']} says: {prompt[::-1]}")


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    with ChatServer(answer_or_judge) as server:
        yield server


def environment(bootstrap: str, database_url: str, api: str) -> dict[str, str]:
    return {
        **os.environ,
        "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ROUTER_MODELS": json.dumps(MODELS),
        "ROUTER_MODEL_PRICES": json.dumps(PRICES),
        "ROUTER_MODE": "budget",
        # Enough for every query on the dear model: only knowledge holds it back.
        "ROUTER_BUDGET_PER_QUERY_USD": "0.1",
        "ROUTER_EXPLORATION_SHARE": str(EXPLORATION_SHARE),
        "ROUTER_WINDOW_SECONDS": "1",
        "ROUTER_STORE_REFRESH_SECONDS": "1",
        "ROUTER_REFIT_SECONDS": "3600",
        "ROUTER_REFIT_GROWTH": "0",
        "KAFKA_PARTITIONS": "2",
        "OPENAI_BASE_URL": api,
        "JUDGE_BASE_URL": api,
        "JUDGE_MODEL": "the-judge",
        "JUDGE_SAMPLE_SHARE": "1.0",
        "METRICS_PORT": "0",
    }


def queries(run: str, first: int, count: int) -> list[tuple[str, str]]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return [
        (
            f"{run}-{i}",
            QueryEvent(
                query_id=f"{run}-{i}", text=f"question {i}: {' '.join(words[i % 8 :])}?"
            ).model_dump_json(),
        )
        for i in range(first, first + count)
    ]


def routed(bootstrap: str, names: dict[str, str]) -> tuple[list[Assignment], list[WindowReport]]:
    """Every assignment on the models' route topics, and every window report."""
    assignments = [
        Assignment.model_validate_json(raw)
        for model in MODELS
        for raw in asyncio.run(read_topic(bootstrap, names[f"route:{model}"]))
    ]
    reports = [
        WindowReport.model_validate_json(raw)
        for raw in asyncio.run(read_topic(bootstrap, names["windows"]))
    ]
    return assignments, reports


def judged(engine: sa.Engine, run: str) -> dict[str, list[float]]:
    """The judge's stored scores of this run, by model."""
    with Session(engine) as session:
        rows = session.execute(
            sa.select(OutcomeRow.model, OutcomeRow.quality_score).where(
                OutcomeRow.query_id.like(f"{run}-%"), OutcomeRow.score_source == "judge"
            )
        ).all()
    return {model: [s for m, s in rows if m == model and s is not None] for model in MODELS}


def test_an_empty_store_learns_from_the_judge_and_routing_follows(
    chat_server: ChatServer, postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(router_models=MODELS, kafka_partitions=2)
    names = settings.topic_names()
    engine = sa.create_engine(postgres_url)
    run = f"learn-{uuid.uuid4().hex[:6]}"
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        env = environment(bootstrap, postgres_url, chat_server.base_url)
        log = tmp_path / "workers.log"
        commands = ["router", "outcomes", "model-worker openai", "judge openai"]
        processes = [start_worker(command, env, log) for command in commands]
        try:
            # First traffic: nothing known, every prediction the shared prior.
            asyncio.run(produce_values(bootstrap, names["queries"], queries(run, 0, 40)))
            wait_until(lambda: len(judged(engine, run)["dear"]) >= 3, 120, "judged dear answers")
            wait_until(lambda: len(judged(engine, run)["cheap"]) >= 3, 60, "judged cheap answers")
            # Probes until the router's store has the scores (it refreshes every second).
            probes = iter(range(1000, 1100))

            def learned() -> bool:
                probe = next(probes)
                asyncio.run(produce_values(bootstrap, names["queries"], queries(run, probe, 1)))
                predicted = asyncio.run(read_topic(bootstrap, names["predicted"]))
                return any(
                    p.quality[0] - p.quality[1] > 0.3
                    for raw in predicted
                    for p in PredictedBatch.model_validate_json(raw).predictions()
                    if int(p.query.query_id.rsplit("-", 1)[1]) >= 1000  # a probe
                    and len(p.query.query_id) > len(run) + 4
                )

            wait_until(learned, 60, "a prediction that has learned from the judge")
            # Later traffic.
            asyncio.run(produce_values(bootstrap, names["queries"], queries(run, 100, 40)))
            later_ids = {f"{run}-{i}" for i in range(100, 140)}

            def assigned() -> set[str]:
                return {a.query_id for a in routed(bootstrap, names)[0]}

            wait_until(lambda: later_ids <= assigned(), 120, "assignments of the later queries")
            assert all(p.poll() is None for p in processes), log.read_text()[-3000:]
            predicted = [
                p
                for raw in asyncio.run(read_topic(bootstrap, names["predicted"]))
                for p in PredictedBatch.model_validate_json(raw).predictions()
            ]
            assignments, reports = routed(bootstrap, names)
            scores = judged(engine, run)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)

    print("judged outcomes:", scores)
    assert set(scores["dear"]) == {0.9} and set(scores["cheap"]) == {0.2}
    by_id = {p.query.query_id: p for p in predicted}
    first = [by_id[f"{run}-{i}"] for i in range(40)]
    later = [by_id[f"{run}-{i}"] for i in range(100, 140)]
    # Cold: the shared prior for both models, resting on no outcome at all.
    assert first[0].quality == [0.5, 0.5] and first[0].support == [0.0, 0.0]
    # Learned: dear predicted well above cheap, on stored outcomes' support.
    dear_minus_cheap = [p.quality[0] - p.quality[1] for p in later]
    assert min(dear_minus_cheap) > 0.3, dear_minus_cheap
    assert min(p.support[0] for p in later) > 1.0
    # Routing followed: cheap (the tie's winner) first, dear once it is known better.
    model_of = {a.query_id: a for a in assignments}
    first_plan = [model_of[f"{run}-{i}"] for i in range(40)]
    later_plan = [model_of[f"{run}-{i}"] for i in range(100, 140)]
    assert all(a.model == "cheap" for a in first_plan if not a.exploration)
    assert sum(a.model == "dear" for a in later_plan) >= 36
    # Exploration: marked, and within its share of each window's queries and budget.
    explored = [a for a in first_plan if a.exploration]
    assert explored and all(a.model == "dear" for a in explored)
    for report in reports:
        budget = report.window_budget_usd or 0.0
        assert report.exploration_queries <= math.floor(
            EXPLORATION_SHARE * report.query_count + 0.5
        )
        assert report.predicted_spend_usd <= budget + 1e-9
    # An allowance a window leaves carries over, so the share holds over the windows.
    explored_spend = sum(r.exploration_spend_usd for r in reports)
    assert explored_spend <= EXPLORATION_SHARE * sum(r.window_budget_usd or 0.0 for r in reports)
    assert sum(r.exploration_queries for r in reports) == sum(a.exploration for a in assignments)
    judge_log = log.read_text()
    assert re.search(r"Traceback", judge_log) is None, judge_log[-3000:]


def test_shadow_answers_are_judged_into_outcomes_never_final_and_reported(
    chat_server: ChatServer, postgres_url: str, tmp_path: Path
) -> None:
    """A second model answers a share of the queries only to be learnt from: the
    judge scores every shadow answer (and nothing else here: JUDGE_SAMPLE_SHARE=0),
    the scores are stored, no shadow answer is final, each query has exactly one
    final answer, and the window reports count the shadows within the budget."""
    settings = Settings(router_models=MODELS, kafka_partitions=2)
    names = settings.topic_names()
    engine = sa.create_engine(postgres_url)
    run = f"shadow-{uuid.uuid4().hex[:6]}"
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        env = {
            **environment(bootstrap, postgres_url, chat_server.base_url),
            "ROUTER_EXPLORATION_SHARE": "0",
            "ROUTER_SHADOW_SHARE": "0.2",
            "JUDGE_SAMPLE_SHARE": "0",
        }
        log = tmp_path / "workers.log"
        commands = ["router", "outcomes", "model-worker openai", "judge openai"]
        processes = [start_worker(command, env, log) for command in commands]
        ids = {f"{run}-{i}" for i in range(30)}
        try:
            asyncio.run(produce_values(bootstrap, names["queries"], queries(run, 0, 30)))

            def responses() -> list[ModelResponse]:
                return [
                    ModelResponse.model_validate_json(raw)
                    for raw in asyncio.run(read_topic(bootstrap, names["responses"]))
                    if json.loads(raw)["query_id"] in ids
                ]

            def finals() -> set[str]:
                return {r.query_id for r in responses() if r.final}

            wait_until(lambda: finals() == ids, 120, "a final answer to every query")
            shadow_answers = [r for r in responses() if r.role == "shadow"]
            assert shadow_answers, "no shadow answer was asked"
            shadow_pairs = {(r.query_id, r.model) for r in shadow_answers}
            wait_until(
                lambda: shadow_pairs <= judged_pairs(engine, run), 120, "judged shadow answers"
            )
            assert all(p.poll() is None for p in processes), log.read_text()[-3000:]
            all_responses = responses()
            assignments, reports = routed(bootstrap, names)
            stored = judged_pairs(engine, run)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)

    # Never final; exactly one final answer per query, from another model than its shadow.
    assert not any(r.final for r in all_responses if r.role == "shadow")
    final_of = [r for r in all_responses if r.final]
    assert sorted(r.query_id for r in final_of) == sorted(ids)
    answered = {r.query_id: r.model for r in final_of}
    assert all(answered[q] != m for q, m in shadow_pairs)
    # Judged into outcomes: every shadow answer, and (sample share 0) nothing else.
    assert stored == shadow_pairs
    # Counted in the window reports, within each window's budget.
    shadows = [a for a in assignments if a.role == "shadow"]
    assert {(a.query_id, a.model) for a in shadows} == shadow_pairs
    assert sum(r.shadow_queries for r in reports) == len(shadows)
    assert sum(r.shadow_spend_usd for r in reports) == pytest.approx(
        sum(a.predicted_cost_usd for a in shadows)
    )
    for report in reports:
        assert report.shadow_spend_usd <= 0.2 * (report.window_budget_usd or 0.0) + 1e-12
        assert report.predicted_spend_usd <= (report.window_budget_usd or 0.0) + 1e-9


def judged_pairs(engine: sa.Engine, run: str) -> set[tuple[str, str]]:
    """(query id, model) of this run's outcomes the judge scored."""
    with Session(engine) as session:
        rows = session.execute(
            sa.select(OutcomeRow.query_id, OutcomeRow.model).where(
                OutcomeRow.query_id.like(f"{run}-%"),
                OutcomeRow.score_source == "judge",
                OutcomeRow.quality_score.is_not(None),
            )
        ).all()
    return {(q, m) for q, m in rows}
