"""Model workers: consume omnirouter.route.<model>, answer, publish Outcome and ModelResponse.

The replay worker answers from recorded outcomes in a RouterBench-format file,
after a configurable latency: the demo and the benchmarks use it in place of
real LLMs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import faust
from faust.types import StreamT

from schemas import Assignment, ModelResponse, Outcome
from workers.config import Settings
from workers.routing.dataset import OutcomeTable, load_routerbench
from workers.stream.app import Topics, batches, make_app
from workers.stream.codec import BadEvent, dead_letter, decode, encode

log = logging.getLogger(__name__)


class ReplayBook:
    """Recorded outcomes, found by prompt text (or by metadata sample_id)."""

    def __init__(self, table: OutcomeTable) -> None:
        self.table = table
        self._by_text = {prompt: row for row, prompt in enumerate(table.prompts)}
        self._by_id = {sample_id: row for row, sample_id in enumerate(table.sample_ids)}

    def answer(self, assignment: Assignment) -> tuple[Outcome, ModelResponse]:
        row = self._by_text.get(assignment.text)
        if row is None:
            row = self._by_id.get(str(assignment.metadata.get("sample_id")))
        error = None
        score = cost = None
        response = None
        if row is None or assignment.model not in self.table.models:
            error = "no recorded outcome for this query and model"
        else:
            column = self.table.models.index(assignment.model)
            recorded_score = float(self.table.scores[row, column])
            recorded_cost = float(self.table.costs[row, column])
            score = None if recorded_score != recorded_score else recorded_score  # NaN: unknown
            cost = None if recorded_cost != recorded_cost else recorded_cost
            response = self.table.responses[row].get(assignment.model)
        outcome = Outcome(
            query_id=assignment.query_id,
            model=assignment.model,
            pool=assignment.pool,
            quality_score=score,
            cost_usd=cost,
            error=error,
            text=assignment.text,
        )
        answer = ModelResponse(
            query_id=assignment.query_id,
            model=assignment.model,
            pool=assignment.pool,
            response=response,
            error=error,
            metadata=assignment.metadata,
        )
        return outcome, answer


def build_replay_app(
    settings: Settings, bootstrap_servers: str, data_path: Path, models: Sequence[str] | None = None
) -> faust.App:
    served = list(models or settings.router_models)
    unknown = set(served) - set(settings.router_models)
    if unknown:
        raise ValueError(f"models not in ROUTER_MODELS: {sorted(unknown)}")
    book = ReplayBook(load_routerbench(data_path))
    app = make_app("omnirouter-model-replay", settings, bootstrap_servers)
    topics = Topics.of(app, settings)
    names = settings.topic_names()
    routes = app.topic(
        *[names[f"route:{m}"] for m in served], key_serializer="raw", value_serializer="raw"
    )
    latency = settings.replay_latency_ms / 1000

    @app.agent(routes)
    async def answer(stream: StreamT[bytes]) -> None:
        async for events in batches(stream, 200, 0.05):
            assignments: list[Assignment] = []
            for event in events:
                message = event.message
                try:
                    assignments.append(decode(message.value, Assignment))
                except BadEvent as exc:
                    letter = dead_letter(
                        message.value, message.topic, message.partition, message.offset, str(exc)
                    )
                    await topics.deadletter.send(key=message.key, value=encode(letter))
            if not assignments:
                continue
            await asyncio.sleep(latency)  # the batch is answered concurrently
            sent = []
            for assignment in assignments:
                outcome, response = book.answer(assignment)
                outcome = outcome.model_copy(update={"latency_ms": settings.replay_latency_ms})
                key = assignment.query_id.encode()
                sent.append(await topics.outcomes.send(key=key, value=encode(outcome)))
                sent.append(await topics.responses.send(key=key, value=encode(response)))
            await asyncio.gather(*sent)

    return app
