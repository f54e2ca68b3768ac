"""Event contracts: the one source of truth for every message on every topic.

Each event carries `schema_version`; a consumer rejects (dead-letters) versions
it does not know. `python -m schemas.export` writes JSON Schema for producers
and consumers in other languages to schemas/jsonschema/.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1
MAX_ID_LENGTH = 200


def utc_now() -> datetime:
    return datetime.now(UTC)


def _assume_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# A time without a zone is taken as UTC, so times from any producer compare.
UtcDatetime = Annotated[datetime, AfterValidator(_assume_utc)]


class Event(BaseModel):
    """Every event names its contract's version (`schema_version`, declared by each
    event: 1, or 1 and 2 where version 2 added optional fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Who gave an outcome's quality score, weakest first: a stronger source's score
# is never replaced by a weaker one's (a user's feedback outranks a judge's).
ScoreSource = Literal["judge", "replay", "user"]
SCORE_SOURCE_RANK: dict[str, int] = {"judge": 1, "replay": 2, "user": 3}


class QueryHints(BaseModel):
    """Optional per-query limits. allowed_models is strict; max_cost_usd and
    min_quality narrow the choice while some model still meets them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_cost_usd: float | None = Field(default=None, ge=0)
    min_quality: float | None = Field(default=None, ge=0, le=1)
    allowed_models: list[str] | None = Field(default=None, min_length=1)


class QueryEvent(Event):
    """A query to route. Topic `omnirouter.queries`; producers choose query_id."""

    schema_version: Literal[1] = SCHEMA_VERSION

    query_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    text: str = Field(min_length=1)
    pool: str = Field(default="default", min_length=1, max_length=MAX_ID_LENGTH)
    created_at: UtcDatetime = Field(default_factory=utc_now)
    hints: QueryHints | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


# Why a model is asked. answer: its answer is the query's answer. probe: a cheap
# model asked first; the router reads the probes' answers and then accepts one or
# escalates (a cascade pool). escalation: asked after the probes were doubted; its
# answer is the query's answer. shadow: a second answer only to learn from (judged,
# never the query's answer).
AssignmentRole = Literal["answer", "probe", "escalation", "shadow"]
FINAL_ROLES: frozenset[str] = frozenset({"answer", "escalation"})


class Assignment(Event):
    """A routed query. Topic `omnirouter.route.<model>`, keyed by query_id.

    Version 2 added `exploration`: the router sent the query to this model to
    learn about it (ROUTER_EXPLORATION_SHARE), not because it predicted it best.
    Version 3 added `role` (see AssignmentRole); without it, "answer"."""

    schema_version: Literal[1, 2, 3] = 3
    query_id: str
    text: str
    model: str
    pool: str
    window_id: str
    window_start: datetime
    window_end: datetime
    predicted_quality: float
    predicted_cost_usd: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    exploration: bool = False
    role: AssignmentRole = "answer"


# optimal: proven by the exact solver; near_optimal: the fast path's feasible plan;
# time_limited: the best plan found when the time limit struck; infeasible_*: the
# budget or target could not be met, so the cheapest or the best plan was used;
# unjudged_target_best_quality_plan: the target was not reached by predictions
# that rest on priors alone (too few stored outcomes to judge it yet).
SolverStatus = Literal[
    "optimal",
    "near_optimal",
    "time_limited",
    "infeasible_budget_cheapest_plan",
    "infeasible_target_best_quality_plan",
    "unjudged_target_best_quality_plan",
]


class WindowReport(Event):
    """One per solved window. Topic `omnirouter.windows`.

    Version 2 added the exploration figures (included in the query count and
    the predicted spend) and `mean_support`: stored outcomes' worth behind the
    chosen predictions, on average (0: priors alone).

    Version 3 added what went to each kind of assignment besides answers, all
    included in the predicted spend: a cascade pool's probes and its escalations
    (an escalation window reports only those), the escalation spend the first
    stage expects and keeps back for the escalation windows, and shadow answers
    (a second answer only to learn from, paid from the exploration allowance).

    Version 4 added `spend_correction_usd`: what this window gave up of its nominal
    budget to repay the pool's realised overspend (`window_budget_usd` is what was
    left: the nominal budget is their sum)."""

    schema_version: Literal[1, 2, 3, 4] = 4
    window_id: str
    pool: str
    window_start: datetime
    window_end: datetime
    query_count: int
    mode: Literal["budget", "quality"]
    window_budget_usd: float | None = None
    quality_target: float | None = None
    predicted_spend_usd: float
    predicted_mean_quality: float
    solver: str
    solver_status: SolverStatus
    solve_seconds: float
    assignments_per_model: dict[str, int]
    exploration_queries: int = 0
    exploration_spend_usd: float = 0.0
    exploration_per_model: dict[str, int] = Field(default_factory=dict)
    # Budget mode: exploration allowance this window left to the pool's next one.
    exploration_carried_usd: float = 0.0
    mean_support: float | None = None
    probe_queries: int = 0
    probe_spend_usd: float = 0.0
    escalation_queries: int = 0
    escalation_spend_usd: float = 0.0
    escalation_reserve_usd: float = 0.0
    shadow_queries: int = 0
    shadow_spend_usd: float = 0.0
    spend_correction_usd: float = 0.0


class Outcome(Event):
    """What a model did with a query. Topic `omnirouter.outcomes`.

    quality_score may be None at first and arrive later, from a judge or from
    the application's user (feedback). Version 2 added `source`, who gave the
    score (a score without one counts as the user's), and `judge_cost_usd`,
    what the judge's call cost. Version 3 added `response`, an excerpt of the
    model's answer (its beginning and its end, where final answers stand; at
    most OUTCOME_RESPONSE_MAX_CHARS), stored for learning from answers.
    """

    schema_version: Literal[1, 2, 3] = 3
    query_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    model: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    pool: str = "default"
    quality_score: float | None = Field(default=None, ge=0, le=1)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    # Costs and latency finite: 1e400 holds no NaN or Infinity for the codec to
    # refuse, yet reads as inf, which the pool's ledger would book
    # (workers/routing/spend.py) and the metrics would sum.
    cost_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    latency_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    error: str | None = None
    text: str | None = None  # the query text, so the store can embed it
    created_at: UtcDatetime = Field(default_factory=utc_now)
    source: ScoreSource | None = None
    judge_cost_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    response: str | None = None

    @property
    def score_source(self) -> ScoreSource | None:
        """Who gave quality_score; None when there is no score."""
        if self.quality_score is None:
            return None
        return self.source or "user"


class ModelResponse(Event):
    """A model's answer to a routed query. Topic `omnirouter.responses`, keyed by query_id.

    Version 2 added `text`, the query's text, so a judge can read the question, and
    `exploration`, copied from the Assignment (a judge scores every such answer).
    Version 3 added `role`, copied from the Assignment, and `final`: this response
    is the query's answer. Exactly one response per valid query has final=true;
    applications that want the answer read those only and need not know about
    probes, escalations or shadow answers. (A probe's answer the router accepts is
    published again, by the router, with final=true.) Without them: "answer", true."""

    schema_version: Literal[1, 2, 3] = 3
    query_id: str
    model: str
    pool: str
    response: str | None
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    text: str | None = None
    exploration: bool = False
    role: AssignmentRole = "answer"
    final: bool = True


class PredictedQuery(Event):
    """Internal, between the router's two stages (topic `omnirouter.predicted`, keyed
    by pool): a valid query with its predicted quality and cost for every model,
    in the order of ROUTER_MODELS."""

    schema_version: Literal[1] = SCHEMA_VERSION

    query: QueryEvent
    models: list[str]
    quality: list[float]
    cost_usd: list[float]
    # Stored outcomes' worth behind each quality prediction (0: the prior alone).
    support: list[float] = Field(default_factory=list)
    # The query's cluster of stored queries and the variance of each model's mean
    # there (none: nothing stored yet, or an older router's event); budget windows
    # keep the best single model unless a plan beats it by more than that allows.
    cluster: int | None = None
    mean_variance: list[float] = Field(default_factory=list)
    predicted_at: datetime = Field(default_factory=utc_now)
    # A cascade pool's query: its cluster under the pool's fitted cascade and that
    # fit's id (FittedCascade.fit_id), so the first stage need not embed it again
    # (none: not a cascade pool, its cascade not fitted yet, or an older record).
    cascade_cluster: int | None = Field(default=None, ge=0)
    cascade_fit: str | None = None

    @model_validator(mode="after")
    def _one_value_per_model(self) -> PredictedQuery:
        for name in ("quality", "cost_usd"):
            if len(getattr(self, name)) != len(self.models):
                raise ValueError(f"{name} must hold one value per model")
        for name in ("support", "mean_variance"):
            values = getattr(self, name)
            if values and len(values) != len(self.models):
                raise ValueError(f"{name} must hold one value per model, or none")
        return self


class PredictedBatch(Event):
    """Internal, between the router's two stages (topic `omnirouter.predicted`, keyed
    by pool): the predictions of one pool's queries of one micro-batch, as one
    record, so the stages pass one message per batch, not one per query. The
    models are named once; row i of `quality`, `cost_usd` and `support` belongs to
    `queries[i]`, in the order of `models`. The window stage reads each row as a
    PredictedQuery (`predictions`) and still decides query by query; it also reads
    single PredictedQuery records (of routers before batches)."""

    schema_version: Literal[1] = SCHEMA_VERSION

    models: list[str]
    queries: list[QueryEvent] = Field(min_length=1)
    quality: list[list[float]]
    cost_usd: list[list[float]]
    # Stored outcomes' worth behind each quality prediction (0: the prior alone).
    support: list[list[float]]
    # Small stores (PredictedQuery.cluster, .mean_variance): each query's cluster and
    # the variance of each model's mean there; empty when not known.
    cluster: list[int | None] = Field(default_factory=list)
    mean_variance: list[list[float]] = Field(default_factory=list)
    predicted_at: datetime = Field(default_factory=utc_now)
    # PredictedQuery.cascade_cluster and .cascade_fit of each query; empty when no
    # query of the batch is of a cascade pool whose cascade is fitted.
    cascade_cluster: list[Annotated[int, Field(ge=0)] | None] = Field(default_factory=list)
    cascade_fit: list[str | None] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_row_per_query(self) -> PredictedBatch:
        rows = len(self.queries)
        for name in ("quality", "cost_usd", "support"):
            matrix = getattr(self, name)
            if len(matrix) != rows or any(len(row) != len(self.models) for row in matrix):
                raise ValueError(f"{name} must hold one row per query, one value per model")
        if self.cluster and len(self.cluster) != rows:
            raise ValueError("cluster must hold one value per query, or none")
        if self.mean_variance and (
            len(self.mean_variance) != rows
            or any(len(row) != len(self.models) for row in self.mean_variance)
        ):
            raise ValueError("mean_variance must hold one row per query, one value per model")
        if len(self.cascade_cluster) != len(self.cascade_fit) or (
            self.cascade_cluster and len(self.cascade_cluster) != rows
        ):
            raise ValueError(
                "cascade_cluster and cascade_fit must hold one value per query, or none"
            )
        return self

    def predictions(self) -> list[PredictedQuery]:
        """One PredictedQuery per query (already validated here, so not again)."""
        rows = len(self.queries)
        columns = zip(
            self.queries,
            self.quality,
            self.cost_usd,
            self.support,
            self.cluster or [None] * rows,
            self.mean_variance or [[] for _ in range(rows)],
            self.cascade_cluster or [None] * rows,
            self.cascade_fit or [None] * rows,
            strict=True,
        )
        return [
            PredictedQuery.model_construct(
                schema_version=self.schema_version,
                query=query,
                models=self.models,
                quality=quality,
                cost_usd=cost,
                support=support,
                cluster=cluster,
                mean_variance=variance,
                predicted_at=self.predicted_at,
                cascade_cluster=carried,
                cascade_fit=fit,
            )
            for query, quality, cost, support, cluster, variance, carried, fit in columns
        ]


class ProbeAnswer(BaseModel):
    """One panel model's answer to a probed query (None: an error, or no answer
    before the deadline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    response: str | None = None
    error: str | None = None


class ProbedQuery(Event):
    """Internal, between a cascade pool's probes and its escalation stage (topic
    `omnirouter.probed`, keyed by pool like `omnirouter.predicted`): the query's
    prediction and every panel model's answer, in the panel's order.

    `cascade_cluster` is the query's cluster under the pool's fitted cascade that
    probed it (`cascade_fit`, that fit's id), carried from the first stage so the
    escalation stage need not embed the query again; when the pool's cascade was
    refitted since, or the record has none (an older router's), the escalation
    stage embeds the query.

    Version 2 added `quality_needed` (a quality-mode pool): the mean predicted
    quality the escalation stage must reach over its first-stage window's probed
    queries for that window to meet the pool's quality target; None in budget mode
    (the escalations spend the pool's reserve instead)."""

    schema_version: Literal[1, 2] = 2

    predicted: PredictedQuery
    answers: list[ProbeAnswer]
    probed_at: datetime = Field(default_factory=utc_now)
    cascade_cluster: int | None = Field(default=None, ge=0)
    cascade_fit: str | None = None
    quality_needed: float | None = Field(default=None, ge=0.0, le=1.0)


class DeadLetter(Event):
    """An event that could not be processed, kept with the reason. Topic `omnirouter.deadletter`.

    Version 2 added `truncated` and `original_size_bytes`: a letter holds no more
    of the original bytes than fits in one produce request, so for a larger event
    `raw_base64` is an excerpt (its first bytes) and the source position finds the
    whole; and `source_last_offset`, the last offset of a record batch that could
    not be decoded at all (its bytes are not kept; `source_offset` is its first)."""

    schema_version: Literal[1, 2] = 2

    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    raw_base64: str
    created_at: UtcDatetime = Field(default_factory=utc_now)
    truncated: bool = False
    original_size_bytes: int | None = Field(default=None, ge=0)  # None: not known
    source_last_offset: int | None = None


ALL_EVENTS: tuple[type[Event], ...] = (
    QueryEvent,
    Assignment,
    WindowReport,
    Outcome,
    ModelResponse,
    DeadLetter,
    PredictedQuery,
    ProbedQuery,
    PredictedBatch,
)
