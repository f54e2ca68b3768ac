"""What every judge shares: consume omnirouter.responses, score a deterministic sample
of the answers, publish each score as an Outcome (source "judge") on omnirouter.outcomes.

A judge kind is just a `Judge` (one file each: judge_openai.py, judge_replay.py),
as a model worker kind is an `Answerer` (model_worker.py). The outcome writer's
upsert keeps a stronger source's score, so a judge never overrides the user's
feedback or a recorded (replay) score.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import faust
from faust.types import EventT, StreamT
from mode import CrashingSupervisor
from pydantic import ValidationError

from schemas import ModelResponse, Outcome
from workers.config import Settings
from workers.stream import metrics
from workers.stream.app import Topics, batches, decode_or_dead_letter, make_app
from workers.stream.codec import decode, encode

log = logging.getLogger(__name__)

JUDGE_APP_PREFIX = "omnirouter-judge"
MAX_BATCH_EVENTS = 1000


@dataclass(frozen=True)
class Verdict:
    """What a judge made of one answer: a score in [0, 1], or None and why not."""

    score: float | None = None
    cost_usd: float | None = None  # what judging it cost; None: unknown
    error: str | None = None


class Judge(Protocol):
    async def score(self, responses: Sequence[ModelResponse]) -> list[Verdict]:
        """One Verdict per response, in order. A failed call is a Verdict without a
        score, not an exception."""
        ...

    async def close(self) -> None: ...


def hashed_share(query_id: str, model: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, query_id, model) and spread uniformly:
    the same answer is always sampled (or flipped) the same way, in every process
    and after a replayed batch."""
    key = "\x1f".join((salt, query_id, model)).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_sampled(response: ModelResponse, share: float) -> bool:
    """Every exploratory or shadow answer (the router paid for it to learn:
    unjudged it teaches nothing), and a share of the others chosen by hash."""
    if response.exploration or response.role == "shadow":
        return True
    return hashed_share(response.query_id, response.model, "sample") < share


def events_per_batch(concurrency: int, share: float) -> int:
    """Events to take at once so that about `concurrency` of them are sampled."""
    wanted = concurrency / share if share > 0 else MAX_BATCH_EVENTS
    return max(1, min(MAX_BATCH_EVENTS, math.ceil(wanted)))


def select(responses: Sequence[ModelResponse], share: float) -> list[ModelResponse]:
    """The responses to judge: answered, without an error, in the sample. The rest
    are counted as skipped. An accepted probe answer, which the router publishes
    again as the query's final answer, was sampled as a probe already: judging it
    again would pay twice for one score."""
    chosen = []
    for response in responses:
        if response.error is not None or not (response.response or "").strip():
            metrics.JUDGE_VERDICTS.labels(response.model, "skipped_error").inc()
        elif response.role == "probe" and response.final:
            metrics.JUDGE_VERDICTS.labels(response.model, "skipped_republished").inc()
        elif not is_sampled(response, share):
            metrics.JUDGE_VERDICTS.labels(response.model, "skipped_unsampled").inc()
        else:
            chosen.append(response)
    return chosen


def checked(verdict: Verdict) -> Verdict:
    """The verdict, without a score outside [0, 1] (or NaN) and a cost below 0: a
    judge's bug costs that answer its score, not the batch."""
    score, cost = verdict.score, verdict.cost_usd
    cost = cost if cost is not None and cost >= 0 else None
    if score is not None and not 0.0 <= score <= 1.0:
        return Verdict(score=None, cost_usd=cost, error=f"score {score!r} outside [0, 1]")
    return Verdict(score=score, cost_usd=cost, error=verdict.error)


def verdict_outcome(response: ModelResponse, verdict: Verdict) -> Outcome | None:
    """The outcome to publish: the score with its cost; without a score, the cost
    alone when the call cost something (so the spend is counted); else nothing."""
    cost = verdict.cost_usd
    if verdict.score is None and not (cost and cost > 0):
        return None
    try:
        return Outcome(
            query_id=response.query_id,
            model=response.model,
            pool=response.pool,
            quality_score=verdict.score,
            source="judge",
            judge_cost_usd=cost,
        )
    except ValidationError as exc:
        # A response no outcome can name (a query id over the outcome's limit):
        # raising would leave its batch unacknowledged, judged and paid again on
        # every restart.
        log.warning("judged a response no outcome can hold: %s", exc.errors()[0]["msg"])
        return None


def observe_verdict(response: ModelResponse, verdict: Verdict) -> None:
    result = "no_score" if verdict.score is None else "scored"
    metrics.JUDGE_VERDICTS.labels(response.model, result).inc()
    if verdict.score is not None:
        metrics.JUDGE_SCORE.labels(response.model).inc(verdict.score)
    if verdict.cost_usd:
        metrics.JUDGE_SPEND_USD.inc(verdict.cost_usd)


async def judge_events(
    events: Sequence[EventT], judge: Judge, share: float, topics: Topics
) -> None:
    """Decode a batch (bad bytes: dead letters), judge its sample, count the verdicts
    and their spend (paid once the judge answered), publish the outcomes and wait
    until the broker has them. A failed publish raises: the batch is not
    acknowledged, and is judged again once the worker restarts."""
    decoded = await decode_or_dead_letter(
        events, lambda raw: decode(raw, ModelResponse), topics.deadletter
    )
    chosen = select([response for _, response in decoded], share)
    verdicts = await verdicts_of(judge, chosen) if chosen else None
    if verdicts is None:
        return
    judged = list(zip(chosen, verdicts, strict=True))
    for response, verdict in judged:
        log.debug(
            "judged %s on %s: %s",
            response.query_id,
            response.model,
            verdict.error or f"score {verdict.score}",
            extra={"query_id": response.query_id},
        )
        observe_verdict(response, verdict)
    outcomes = [o for r, v in judged if (o := verdict_outcome(r, v)) is not None]
    sent = [await topics.outcomes.send(key=o.query_id.encode(), value=encode(o)) for o in outcomes]
    await asyncio.gather(*sent)


async def verdicts_of(judge: Judge, responses: Sequence[ModelResponse]) -> list[Verdict] | None:
    """The judge's checked verdicts, one per response; None when it failed
    unexpectedly (logged, and counted by JUDGE_FAILED_BATCHES): the judge scores a
    sample, so a batch it could not judge is skipped, where raising would stop the
    worker on one odd reply."""
    try:
        verdicts = await judge.score(responses)
        if len(verdicts) != len(responses):
            raise ValueError(f"{len(verdicts)} verdicts for {len(responses)} responses")
    except Exception:
        log.exception("a batch of %d responses was not judged", len(responses))
        metrics.JUDGE_FAILED_BATCHES.inc()
        return None
    return [checked(verdict) for verdict in verdicts]


def build_judge_app(
    kind: str, settings: Settings, bootstrap_servers: str, judge: Judge, batch_size: int = 200
) -> faust.App:
    app = make_app(f"{JUDGE_APP_PREFIX}-{kind}", settings, bootstrap_servers)
    topics = Topics.of(app, settings)
    share = settings.judge_sample_share

    @app.agent(topics.responses, supervisor_strategy=CrashingSupervisor)
    async def judge_responses(stream: StreamT[bytes]) -> None:
        async for events in batches(stream, batch_size, 0.05):
            await judge_events(events, judge, share, topics)

    @app.on_before_shutdown.connect
    async def close(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
        await judge.close()

    return app
