"""What every model worker shares: consume omnirouter.route.<model> for the models
it serves, answer a batch of assignments, publish each ModelResponse and Outcome.

A worker kind is just an `Answerer` (one file each: replay_worker.py,
openai_worker.py), in the manner of one class per router behind one interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import faust
from faust.types import StreamT, TopicT
from mode import CrashingSupervisor
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from schemas import FINAL_ROLES, Assignment, ModelResponse, Outcome, ScoreSource
from workers.config import Settings
from workers.stream import metrics
from workers.stream.app import (
    Topics,
    batches,
    decode_or_dead_letter,
    hand_over,
    make_app,
    value_room_bytes,
)
from workers.stream.codec import BadEvent, decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What a model made of one assignment; None where it is not known (yet)."""

    response: str | None = None
    error: str | None = None
    quality_score: float | None = None
    score_source: ScoreSource | None = None  # who gave quality_score
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: float | None = None

    def events(self, assignment: Assignment, response_chars: int) -> tuple[Outcome, ModelResponse]:
        """The Outcome (with `response_chars` of the answer, at most) and the response;
        for an answer whose response or outcome would not fit in a produce request,
        those of `too_large`."""
        response = self.response_event(assignment)
        outcome = self.outcome_event(assignment, response_chars)
        if self.response is not None and not (fits_a_request(response) and fits_a_request(outcome)):
            return self.too_large().events(assignment, response_chars)
        return outcome, response

    def outcome_event(self, assignment: Assignment, response_chars: int) -> Outcome:
        """The usage (and any score) for the store, with `response_chars` of the answer."""
        return Outcome(
            query_id=assignment.query_id,
            model=assignment.model,
            pool=assignment.pool,
            quality_score=self.quality_score,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_usd=self.cost_usd,
            latency_ms=self.latency_ms,
            error=self.error,
            text=assignment.text,
            source=self.score_source,
            response=response_excerpt(self.response, response_chars),
        )

    def response_event(self, assignment: Assignment) -> ModelResponse:
        """The whole answer (or its error) for the application, with the assignment's role."""
        return ModelResponse(
            query_id=assignment.query_id,
            model=assignment.model,
            pool=assignment.pool,
            response=None if self.response is None else encodable(self.response),
            error=self.error,
            metadata=assignment.metadata,
            text=assignment.text,
            exploration=assignment.exploration,
            role=assignment.role,
            final=assignment.role in FINAL_ROLES,
        )

    def too_large(self) -> Answer:
        """The error that stands for an answer too large to publish (megabytes: a
        model looping to its output limit), with its usage: sent, its response would
        fail (MessageSizeTooLargeError) and stop the worker, which would ask again
        and fail again at every start, the batch's other answers with it."""
        error = f"answer of {len(self.response or '')} characters, too large to publish"
        return replace(self, response=None, error=error)


def fits_a_request(event: ModelResponse | Outcome) -> bool:
    """Whether the event, keyed by its query id, fits in one produce request."""
    return len(encode(event)) <= value_room_bytes(event.query_id.encode())


def response_excerpt(response: str | None, max_chars: int) -> str | None:
    """At most `max_chars` of an answer, as the outcomes table can store it: its
    beginning and, for most of it, its end, where final answers usually stand,
    joined by an ellipsis; None for none."""
    if not response or max_chars <= 0:
        return None
    if len(response) > max_chars:
        head = max_chars // 4
        tail = max_chars - head - 1
        response = response[:head] + "\u2026" + response[len(response) - tail :]
    return storable(response)


def storable(text: str) -> str:
    """The text with what PostgreSQL text cannot hold (NUL, a lone surrogate)
    replaced by U+FFFD: a model's odd character must not cost its outcome (the
    writer refuses an outcome the database would refuse, usage and all)."""
    return encodable(text.replace("\x00", "\ufffd"))


def encodable(text: str) -> str:
    """The text with lone surrogates (which a server's JSON may hold as escapes)
    replaced by U+FFFD: UTF-8 cannot encode them, so the event holding them could
    not be published, and the worker would stop on the same answer at every start."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def decode_assignment(raw: bytes | None) -> Assignment:
    """An assignment whose response and outcome can be written, or BadEvent: the
    Outcome holds ids of at most 200 characters, and no event holds a lone
    surrogate; failing there, after the model was paid, stopped the worker on its
    batch at every start."""
    assignment = decode(raw, Assignment)
    try:
        for event in Answer(error="-").events(assignment, 0):
            encode(event)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise BadEvent(f"assignment whose outcome cannot be built: {problems}") from None
    except (PydanticSerializationError, ValueError):
        raise BadEvent("assignment whose response or outcome cannot be written as UTF-8") from None
    return assignment


# How often a batch in hand looks whether a rebalance began: Faust only sets a flag
# (`App.rebalancing`, from its synchronous `on_rebalance_start`), with no event to
# wait on.
REBALANCE_CHECK_SECONDS = 0.1


async def answer_unless_rebalanced(
    app: faust.App, answerer: Answerer, assignments: Sequence[Assignment], grace_seconds: float
) -> list[Answer] | None:
    """The answers, or None when a rebalance began and they were not all in within
    `grace_seconds` of it (the calls are then cancelled). Faust's revocation waits
    for the batch in hand, and a member holding it past the group's rebalance
    timeout was put out of the group while another answered the same assignments
    again: two different final answers published, both paid."""
    answering = asyncio.ensure_future(answerer.answer(assignments))
    loop = asyncio.get_running_loop()
    rebalance_began: float | None = None
    while not answering.done():
        await asyncio.wait({answering}, timeout=REBALANCE_CHECK_SECONDS)
        if answering.done() or not app.rebalancing:
            continue
        rebalance_began = rebalance_began or loop.time()
        if loop.time() - rebalance_began >= grace_seconds:
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
            return None
    return answering.result()


class Answerer(Protocol):
    async def answer(self, assignments: Sequence[Assignment]) -> list[Answer]:
        """One Answer per assignment, in order."""
        ...

    async def close(self) -> None: ...


def build_model_worker_app(
    kind: str,
    settings: Settings,
    bootstrap_servers: str,
    answerer: Answerer,
    models: Sequence[str] | None = None,
    batch_size: int = 200,
) -> faust.App:
    served = list(models or settings.router_models)
    unknown = set(served) - set(settings.router_models)
    if unknown:
        raise ValueError(f"models not in ROUTER_MODELS: {sorted(unknown)}")
    app = make_app(f"omnirouter-model-{kind}", settings, bootstrap_servers)
    topics = Topics.of(app, settings)
    # What a revocation may wait for the batch in hand, well within the rebalance timeout.
    grace = settings.rebalance_timeout_seconds() / 2
    routes = app.topic(
        *[topics.routes[m].get_topic_name() for m in served],
        key_serializer="raw",
        value_serializer="raw",
    )

    @app.agent(routes, supervisor_strategy=CrashingSupervisor)
    async def answer(stream: StreamT[bytes]) -> None:
        async for events in batches(stream, batch_size, 0.05):
            decoded = await decode_or_dead_letter(events, decode_assignment, topics.deadletter)
            assignments = [assignment for _, assignment in decoded]
            if not assignments:
                continue
            answers = await answer_unless_rebalanced(app, answerer, assignments, grace)
            if answers is None:
                log.warning("a rebalance began: %d assignments left to the owner", len(decoded))
                hand_over([event for event, _ in decoded])
                continue
            answered = [
                result.events(a, settings.outcome_response_max_chars)
                for a, result in zip(assignments, answers, strict=True)
            ]
            for assignment, (outcome, _) in zip(assignments, answered, strict=True):
                metrics.ANSWERS.labels(assignment.model, "error" if outcome.error else "ok").inc()
                log.debug(
                    "answered %s with %s",
                    assignment.query_id,
                    assignment.model,
                    extra={"query_id": assignment.query_id, "window_id": assignment.window_id},
                )
            # Outcomes first, acknowledged, then the answers: a judge's score for an
            # answer then always follows the outcome that stores its query (same key,
            # same partition), so the writer never meets a score for a query unknown.
            await publish(topics.outcomes, [outcome for outcome, _ in answered])
            await publish(topics.responses, [response for _, response in answered])

    @app.on_before_shutdown.connect
    async def close(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
        await answerer.close()

    async def publish(topic: TopicT, messages: Sequence[Outcome | ModelResponse]) -> None:
        """Send every message keyed by its query id; return once the broker has them."""
        sent = [await topic.send(key=m.query_id.encode(), value=encode(m)) for m in messages]
        await asyncio.gather(*sent)

    return app
