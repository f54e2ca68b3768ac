"""Gathering a cascade query's probe answers (pure: the router's probe gatherer
keeps the pending state in a table and forwards what this says is ready).

A probe assignment carries, in its metadata under `CASCADE_METADATA_KEY`, the
query's prediction, the panel's models, the query's cluster under the cascade
fit that probed it and (quality mode) the quality its escalation must reach on
average (`quality_needed`); the model worker copies metadata into its response, so each
probe answer brings what the escalation stage needs (it need not embed the query
again).
A query is ready when every panel model answered (an error counts as no
answer), or when `deadline_seconds` passed since its first answer: a missing
answer then counts as none too, so a lost or stalled model never holds a query
back for ever.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas import Assignment, ModelResponse, PredictedQuery, ProbeAnswer, ProbedQuery

# Reserved metadata key of a probe assignment (stripped from the final answer).
CASCADE_METADATA_KEY = "omnirouter_cascade"
NO_ANSWER_BEFORE_DEADLINE = "no answer before the probe deadline"


class PendingProbes(BaseModel):
    """One probed query's answers so far (the gatherer table's value)."""

    model_config = ConfigDict(extra="forbid")

    predicted: PredictedQuery
    panel: list[str]
    answers: dict[str, ProbeAnswer]
    first_answer_at: float  # unix time of its first answer
    partition: int = 0  # of omnirouter.responses, and of the gatherer table's changelog
    # The query's cluster under the cascade fit that probed it (ProbedQuery); None:
    # not known (a probe of an older router).
    cascade_cluster: int | None = None
    cascade_fit: str | None = None
    quality_needed: float | None = None  # ProbedQuery's


def probe_metadata(
    metadata: Mapping[str, Any],
    predicted: PredictedQuery,
    panel: list[str],
    cluster: int | None = None,
    fit: str | None = None,
    quality_needed: float | None = None,
) -> dict[str, Any]:
    """A probe assignment's metadata: the query's own, plus what the gatherer and the
    escalation stage need (`cluster`: the query's under the cascade fit `fit`;
    `quality_needed`: ProbedQuery's, in quality mode)."""
    context = {
        "panel": panel,
        "predicted": predicted.model_dump(mode="json"),
        "cluster": cluster,
        "fit": fit,
        "quality_needed": quality_needed,
    }
    return {**metadata, CASCADE_METADATA_KEY: context}


def carried_cluster(context: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """The cluster and cascade fit a probe's context carries ((None, None): none, or
    not readable, as in a probe of an older router; the escalation stage embeds)."""
    cluster, fit = context.get("cluster"), context.get("fit")
    known = isinstance(cluster, int) and not isinstance(cluster, bool) and cluster >= 0
    return (cluster, fit) if known and isinstance(fit, str) else (None, None)


def carried_quality_needed(context: Mapping[str, Any]) -> float | None:
    """The quality a probe's context says its escalation must reach (None: none, a
    budget-mode probe or an older router's, or not a quality in [0, 1])."""
    needed = context.get("quality_needed")
    if isinstance(needed, bool) or not isinstance(needed, int | float):
        return None
    return float(needed) if 0.0 <= needed <= 1.0 else None


def user_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The query's own metadata, without the router's cascade context."""
    return {k: v for k, v in metadata.items() if k != CASCADE_METADATA_KEY}


def add_answer(
    pending: PendingProbes | None,
    response: ModelResponse,
    now: float,
    partition: int = 0,
    room_bytes: int | None = None,
) -> PendingProbes | None:
    """`pending` with the probe's answer added (the first answer starts it); None
    when the response carries no cascade context (not a probe of this router).
    An answer that would make the gathered answers too large for one record
    (`room_bytes`; None: no limit) is added as an error, no answer: each answer
    fits a request on its own, but two near a megabyte (models looping to their
    output limits) made a pending entry, and a probed query, that the router could
    not write, and the gatherer failed on it at every restart."""
    if pending is None:
        context = response.metadata.get(CASCADE_METADATA_KEY)
        if not isinstance(context, dict):
            return None
        try:
            predicted = PredictedQuery.model_validate(context["predicted"])
            panel = [str(m) for m in context["panel"]]
        except (KeyError, TypeError, ValueError):
            return None
        cluster, fit = carried_cluster(context)
        pending = PendingProbes(
            predicted=predicted,
            panel=panel,
            answers={},
            first_answer_at=now,
            partition=partition,
            cascade_cluster=cluster,
            cascade_fit=fit,
            quality_needed=carried_quality_needed(context),
        )
    if response.model not in pending.panel or response.pool != pending.predicted.query.pool:
        return pending  # not asked, or another pool's query of the same id
    held = pending.answers.get(response.model)
    if held is not None and (held.response is not None or response.error):
        return pending  # a redelivered answer never replaces one in hand with an error
    answer = ProbeAnswer(
        model=response.model,
        response=None if response.error else response.response,
        error=response.error,
    )
    added = _with_answer(pending, answer)
    if room_bytes is None or _fits_with_the_rest(added, room_bytes):
        return added
    return _with_answer(pending, _too_large_to_gather(answer))


# The longest error an answer is gathered as when it does not fit. Room for one is
# kept for every panel model yet to answer, so whatever comes, the record fits.
GATHERED_ERROR_CHARS = 120


def _with_answer(pending: PendingProbes, answer: ProbeAnswer) -> PendingProbes:
    return pending.model_copy(update={"answers": {**pending.answers, answer.model: answer}})


def _too_large_to_gather(answer: ProbeAnswer) -> ProbeAnswer:
    size = len(answer.response or answer.error or "")
    error = f"answer of {size} characters, too large to gather with the panel's other answers"
    return ProbeAnswer(model=answer.model, error=error[:GATHERED_ERROR_CHARS])


def _fits_with_the_rest(pending: PendingProbes, room_bytes: int) -> bool:
    """Do the gathered answers fit `room_bytes`, with the longest error for every
    panel model yet to answer? Measured as the larger of the two records they are
    written as: the pending entry and the probed query forwarded."""
    longest = "x" * GATHERED_ERROR_CHARS
    rest = {
        m: ProbeAnswer(model=m, error=longest) for m in pending.panel if m not in pending.answers
    }
    filled = pending.model_copy(update={"answers": {**pending.answers, **rest}})
    return room_bytes >= max(
        len(filled.model_dump_json().encode()),
        len(probed_query(filled).model_dump_json().encode()),
    )


def is_complete(pending: PendingProbes) -> bool:
    return all(model in pending.answers for model in pending.panel)


def is_overdue(pending: PendingProbes, now: float, deadline_seconds: float) -> bool:
    return now - pending.first_answer_at >= deadline_seconds


def accepted_metadata(metadata: Mapping[str, Any], response: str | None) -> dict[str, Any]:
    """An accepted probe decision's metadata: the query's own, plus the accepted
    answer, so a decision re-sent after a restart needs nothing else."""
    return {**user_metadata(metadata), CASCADE_METADATA_KEY: {"response": response}}


def final_response(decision: Assignment) -> ModelResponse:
    """The accepted probe answer as the query's final answer (`accepted_metadata`)."""
    context = decision.metadata.get(CASCADE_METADATA_KEY) or {}
    return ModelResponse(
        query_id=decision.query_id,
        model=decision.model,
        pool=decision.pool,
        response=context.get("response"),
        metadata=user_metadata(decision.metadata),
        text=decision.text,
        role="probe",
        final=True,
    )


def probed_query(pending: PendingProbes) -> ProbedQuery:
    """The event forwarded to the escalation stage: every panel model's answer, in
    the panel's order; a model that has not answered counts as no answer."""
    answers = [
        pending.answers.get(m, ProbeAnswer(model=m, error=NO_ANSWER_BEFORE_DEADLINE))
        for m in pending.panel
    ]
    return ProbedQuery(
        # Version 1 where the need is none (budget mode): a router of the release
        # before reads it, so a rollback loses no budget pool's probed query.
        schema_version=1 if pending.quality_needed is None else 2,
        predicted=pending.predicted,
        answers=answers,
        cascade_cluster=pending.cascade_cluster,
        cascade_fit=pending.cascade_fit,
        quality_needed=pending.quality_needed,
    )
