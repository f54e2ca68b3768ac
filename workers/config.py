"""The one settings class: every environment variable the service reads.

Each field's environment variable is its upper-cased name. README.md documents
them all in one table; `omnirouter config` prints the values in force.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from schemas.events import MAX_ID_LENGTH

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# The 11 models of the RouterBench sample shipped in workers/data.
ROUTERBENCH_MODELS: tuple[str, ...] = (
    "WizardLM/WizardLM-13B-V1.2",
    "claude-instant-v1",
    "claude-v1",
    "claude-v2",
    "gpt-3.5-turbo-1106",
    "gpt-4-1106-preview",
    "meta/code-llama-instruct-34b-chat",
    "meta/llama-2-70b-chat",
    "mistralai/mistral-7b-chat",
    "mistralai/mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat",
)

TOPIC_PREFIX = "omnirouter"
ROUTER_APP_ID = "omnirouter-router"
# How much of an answer an outcome keeps by default (OUTCOME_RESPONSE_MAX_CHARS).
OUTCOME_RESPONSE_CHARS = 2000
_TOPIC_UNSAFE = re.compile(r"[^a-zA-Z0-9._-]")


def model_topic(model: str) -> str:
    """Kafka topic names allow only [a-zA-Z0-9._-]; model names often hold '/'."""
    return f"{TOPIC_PREFIX}.route.{_TOPIC_UNSAFE.sub('-', model)}"


DATABASE_URL_EXAMPLE = "postgresql+psycopg://user:password@host:5432/omnirouter"


def is_database_url(url: str) -> bool:
    """Whether SQLAlchemy can read `url`: checked at start, not after the embedder
    has loaded (SQLAlchemy's traceback)."""
    try:
        make_url(url)
    except ArgumentError:
        return False
    return True


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# A model's name as every event carries it (an Outcome's model is 1 to 200 characters).
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
# Faust refuses a session timeout above its request timeout (its default, 90 s) when
# a worker's consumer starts.
MAX_SESSION_TIMEOUT_SECONDS = 90.0
# Kafka carries a group's rebalance timeout as a 32-bit count of milliseconds.
MAX_REBALANCE_TIMEOUT_SECONDS = (2**31 - 1) / 1000
Tokens = TypeVar("Tokens", float, "NDArray[np.float64]")


class ModelPrice(BaseModel):
    """List price of one model in US dollars per million tokens."""

    # A misspelt key is an error, not a price silently left at its default.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input_per_mtok_usd: NonNegativeFloat
    output_per_mtok_usd: NonNegativeFloat

    def cost(self, input_tokens: Tokens, output_tokens: Tokens) -> Tokens:
        """USD of that many tokens in and out (counts, or arrays of them)."""
        return (
            input_tokens * self.input_per_mtok_usd + output_tokens * self.output_per_mtok_usd
        ) / 1e6


class PoolPolicy(BaseModel):
    """How one budget pool's windows are solved."""

    # A misspelt key ("model") is an error, not a pool silently given every model.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Literal["budget", "quality"] = "budget"
    window_budget_usd: NonNegativeFloat | None = None
    budget_per_hour_usd: NonNegativeFloat | None = None
    budget_per_query_usd: NonNegativeFloat | None = None
    quality_target: float | None = Field(default=None, ge=0.0, le=1.0)
    models: list[str] | None = Field(default=None, min_length=1)  # None: every configured model
    # An answer-aware cascade (README "Cascade pools"): probe with a cheap panel,
    # escalate only the doubtful answers. Budget or quality mode.
    cascade: bool = False
    # The panel's models; None: chosen from stored outcomes (cascade.choose_panel).
    cascade_panel: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _each_model_once(self) -> PoolPolicy:
        """A model listed twice was two columns of a window: twice its capacity, and
        in a panel its probe paid for twice."""
        for field in ("models", "cascade_panel"):
            names = getattr(self, field) or []
            twice = sorted({m for m in names if names.count(m) > 1})
            if twice:
                raise ValueError(f"{field} names {', '.join(map(repr, twice))} more than once")
        return self

    @model_validator(mode="after")
    def _cascade_is_complete(self) -> PoolPolicy:
        if self.cascade_panel is not None and not self.cascade:
            raise ValueError("cascade_panel needs cascade: true")
        return self

    @model_validator(mode="after")
    def _mode_has_its_limit(self) -> PoolPolicy:
        if (
            self.mode == "budget"
            and self.window_budget_usd is None
            and self.budget_per_hour_usd is None
            and self.budget_per_query_usd is None
        ):
            raise ValueError(
                "budget mode needs window_budget_usd, budget_per_hour_usd or budget_per_query_usd"
            )
        if self.mode == "quality" and self.quality_target is None:
            raise ValueError("quality mode needs quality_target")
        # Two limits were silently resolved (window_budget_usd beat budget_per_hour_usd),
        # and a quality pool's budget was silently ignored.
        limits = [
            name
            for name in ("window_budget_usd", "budget_per_hour_usd", "budget_per_query_usd")
            if getattr(self, name) is not None
        ]
        if self.mode == "budget" and len(limits) > 1:
            raise ValueError(f"budget mode takes one budget limit, got {limits}")
        if self.mode == "quality" and limits:
            raise ValueError(f"quality mode takes no budget limit, got {limits}")
        return self


class Settings(BaseSettings):
    """Environment configuration. Defaults run `make demo` on a fresh machine."""

    # inf / NaN are refused: ROUTER_PRIOR_STRENGTH=inf made every prediction NaN.
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", frozen=True, allow_inf_nan=False
    )

    # Services. Empty means: start or find a local one (see workers/services.py).
    kafka_bootstrap_servers: str = ""
    database_url: str = ""

    # Models and their economics.
    router_models: list[ModelName] = Field(default_factory=lambda: list(ROUTERBENCH_MODELS))
    router_model_prices: dict[str, ModelPrice] = Field(default_factory=dict)
    router_model_capacities: dict[str, PositiveInt] = Field(default_factory=dict)
    router_fallback_model: str | None = None
    # What the user believes each model's quality (P(good answer)) to be before any
    # outcome is stored, e.g. from a public leaderboard; absent: one shared prior.
    router_model_priors: dict[str, Probability] = Field(default_factory=dict)

    # Windows and the default pool policy.
    router_window_seconds: float = Field(default=5.0, gt=0)
    router_max_window_queries: PositiveInt = 2000
    router_mode: Literal["budget", "quality"] = "quality"
    router_window_budget_usd: NonNegativeFloat | None = None
    router_budget_per_hour_usd: NonNegativeFloat | None = None
    router_budget_per_query_usd: NonNegativeFloat | None = None
    router_quality_target: float = Field(default=0.8, ge=0.0, le=1.0)
    router_pools: dict[str, PoolPolicy] = Field(default_factory=dict)

    # Optimiser. The fast path keeps a 2,000-query window's solve to milliseconds;
    # the exact ILP is the reference, bounded by its time limit.
    router_solver: Literal["exact", "fast"] = "fast"
    router_solver_time_limit_seconds: float = Field(default=0.25, gt=0)

    # Text -> vector. "static": distilled from the packaged MiniLM (model2vec), no
    # torch in the router, ~100x faster; "minilm": all-MiniLM-L6-v2 itself. Stored
    # vectors carry their embedder; a router of another re-embeds them from the texts.
    router_embedder: Literal["static", "minilm"] = "static"
    # Where the distilled static embedder is built (by `make`, else on first use).
    embedder_cache_dir: str = ".omnirouter/embedders"

    # Input limits and the predictor.
    router_max_text_chars: PositiveInt = 100_000
    # A query id published longer ago than this is forgotten: a producer's
    # duplicate after it is routed again (bounds the router's memory).
    router_dedup_horizon_seconds: float = Field(default=86_400.0, gt=0)
    router_predict_batch: PositiveInt = 256
    # How far a query's created_at may stand from its record's broker timestamp
    # (and ahead of the router's clock): it decides the hourly budget's share.
    router_clock_skew_seconds: float = Field(default=60.0, ge=0, le=86_400)
    router_store_refresh_seconds: float = Field(default=5.0, gt=0)
    router_refit_seconds: float = Field(default=300.0, gt=0)
    # Also refit once the store holds this share more scored outcomes than the heads
    # were fitted on (checked at each store refresh; 0: on the timer alone).
    router_refit_growth: float = Field(default=0.25, ge=0.0)
    # Heads are refitted on at most this many of the newest stored queries.
    router_refit_max_outcomes: PositiveInt = 20_000
    router_knn_neighbours: PositiveInt = 20
    # How many stored outcomes' worth a model's prior (ROUTER_MODEL_PRIORS, else its
    # mean) counts for beside a query's neighbours: few neighbours, little trust.
    router_prior_strength: PositiveFloat = 10.0
    # Quality within this of another model's, paying the dearest instead of the
    # cheapest, is a tie, won by the cheaper model (both solvers, both modes).
    router_tie_tolerance: NonNegativeFloat = 0.005
    # Share of each window's queries (and, in budget mode, of its budget) that
    # goes to the models the router knows least about where that is worth most.
    router_exploration_share: float = Field(default=0.05, ge=0.0, le=0.5)
    # Share of each window's budget (or what its plan leaves unspent, if more;
    # quality mode: of its planned spend) paid for shadow answers: a second
    # model's answer, judged and never delivered, of a model that might beat the
    # answer, where a label teaches most per dollar (workers/routing/shadow.py).
    router_shadow_share: float = Field(default=0.05, ge=0.0, le=0.5)
    # Budget mode: realised spend over what the plans predicted (matched from the
    # stored outcomes) is taken off the pool's next windows' budgets
    # (workers/routing/spend.py); false keeps budgets on predicted cost alone.
    router_spend_correction: bool = True

    # Model workers.
    replay_data_path: str = ""  # empty: the RouterBench sample shipped in workers/data
    replay_latency_ms: NonNegativeFloat = 50.0
    # Whether the replay model worker reports the recorded quality score with its
    # answer (false: as a real model, no score; a judge or the user scores).
    replay_scores: bool = True
    # How much of each answer its outcome carries into PostgreSQL (its beginning
    # and its end), for learning from answers; 0: none.
    outcome_response_max_chars: NonNegativeInt = OUTCOME_RESPONSE_CHARS

    # The judge (`omnirouter judge`): scores a sample of the answers on
    # omnirouter.responses and publishes them as outcomes (source "judge").
    judge_sample_share: float = Field(default=0.2, ge=0.0, le=1.0)
    judge_base_url: str = "http://127.0.0.1:8000/v1"
    judge_model: str = "judge"
    judge_api_key: SecretStr = SecretStr("")
    judge_price: ModelPrice | None = None  # the judge model's list price, for its spend
    # The rubric sent to the judge; {question} and {answer} are filled in. Empty:
    # the built-in rubric (workers/stream/judge_openai.py).
    judge_rubric: str = ""
    judge_timeout_seconds: float = Field(default=30.0, gt=0)
    judge_max_retries: int = Field(default=4, ge=0)
    judge_max_concurrency: PositiveInt = 8
    # The replay judge (benchmarks, demo): recorded scores, this share flipped.
    judge_flip_share: float = Field(default=0.0, ge=0.0, le=1.0)

    # OpenAI-compatible model worker (vLLM, Ollama, any /v1/chat/completions API).
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: SecretStr = SecretStr("")
    openai_model_map: dict[str, str] = Field(default_factory=dict)  # our name -> upstream name
    openai_timeout_seconds: float = Field(default=60.0, gt=0)  # of one attempt
    # Retries of a call that got HTTP 429 or 5xx, a timeout or a connection error
    # (the openai client's own, as the judge's JUDGE_MAX_RETRIES).
    openai_max_retries: int = Field(default=2, ge=0)
    openai_max_concurrency: PositiveInt = 16
    openai_log_prompts: bool = False

    # Cascade pools: how long the router waits for a probe's answer before it
    # decides without it (a missing answer counts as none, like a model's error).
    cascade_probe_deadline_seconds: float = Field(default=120.0, gt=0)
    # Fewer stored queries with every panel model's answer and score than this: a
    # cascade pool routes one-shot (too little to learn when to trust a probe).
    cascade_min_outcomes: PositiveInt = 200
    # How often cascade pools' policies are refitted (a fit of 2,000 stored queries
    # takes about a minute of one core).
    cascade_refit_seconds: float = Field(default=3600.0, gt=0)
    # What a first-stage window keeps back for its probed queries' escalations and
    # they have not spent this many seconds later (the router's clock) is released:
    # a quiet stretch's unspent reserve never pays for a later burst. With a budget
    # cascade pool, longer than the wait for an escalation (_a_reserve_outlives_its_probes).
    cascade_reserve_seconds: float = Field(default=600.0, gt=0)

    # Operations: each worker's Prometheus port (0: none; unset: 9101 router,
    # 9102 outcome writer, 9103 model worker) and the log format.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # The address /metrics listens on: loopback, not every interface of a laptop;
    # the image (ops/Dockerfile) sets 0.0.0.0, where Prometheus scrapes from outside.
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    log_format: Literal["text", "json"] = "text"

    # Kafka.
    kafka_partitions: PositiveInt = 4
    kafka_replication_factor: PositiveInt = 1
    # Some brokers hold a new consumer group's join for the whole rebalance
    # timeout; short values make workers ready quickly on a single node.
    # None: long enough for a router to finish the window it is gathering when a
    # rebalance starts (window + solver time limit + 2 s); see rebalance_timeout_seconds.
    kafka_rebalance_timeout_seconds: float | None = Field(default=None, gt=0)
    kafka_session_timeout_seconds: float = Field(default=10.0, gt=0, le=MAX_SESSION_TIMEOUT_SECONDS)
    # How long a consumer's fetch may wait for data (workers/stream/transport.py).
    kafka_fetch_max_wait_ms: PositiveInt = 100
    # How the router fences a router that lost its partitions: "on", a Kafka
    # transaction per window (refused at start if the broker has none); "off",
    # generation-checked decisions; "auto", transactions if the broker answers
    # InitProducerId. Each worker command resolves "auto" once, at its start.
    kafka_transactions: Literal["auto", "on", "off"] = "auto"
    # Connection security, for every Kafka client of every worker and command
    # (workers/stream/security.py). Files are PEM.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: str = ""  # empty: the system's trusted authorities
    kafka_ssl_certfile: str = ""  # client certificate, for brokers that ask for one
    kafka_ssl_keyfile: str = ""

    def pool_policy(self, pool: str) -> PoolPolicy:
        """The pool's own policy from ROUTER_POOLS, else the ROUTER_* defaults."""
        if pool in self.router_pools:
            return self.router_pools[pool]
        return PoolPolicy(
            mode=self.router_mode,
            window_budget_usd=self.router_window_budget_usd,
            budget_per_hour_usd=self.router_budget_per_hour_usd,
            budget_per_query_usd=self.router_budget_per_query_usd,
            quality_target=self.router_quality_target,
        )

    def rebalance_timeout_seconds(self) -> float:
        """A router's revocation waits for the window it is gathering to be solved and
        published (Faust's stream_wait_empty); a member slower than the rebalance
        timeout is put out of the group while it may still publish."""
        if self.kafka_rebalance_timeout_seconds is not None:
            return self.kafka_rebalance_timeout_seconds
        return self.router_window_seconds + self.router_solver_time_limit_seconds + 2.0

    def known_pools(self) -> set[str]:
        return {"default", *self.router_pools}

    @model_validator(mode="after")
    def _models_are_consistent(self) -> Settings:
        if not self.router_models:
            raise ValueError("ROUTER_MODELS must name at least one model")
        topics = [model_topic(m) for m in self.router_models]
        # Kafka refuses a topic that differs from an existing one only by '.' and '_'
        # (their metric names collide): the second model's topic would fail to be created.
        if len({t.replace(".", "_") for t in topics}) != len(topics):
            raise ValueError(f"ROUTER_MODELS map to clashing topic names: {topics}")
        known = set(self.router_models)
        named = {
            "ROUTER_MODEL_PRICES": set(self.router_model_prices),
            "ROUTER_MODEL_PRIORS": set(self.router_model_priors),
            "ROUTER_MODEL_CAPACITIES": set(self.router_model_capacities),
            # A misspelt name here sent our name to the API instead of its own.
            "OPENAI_MODEL_MAP": set(self.openai_model_map),
            "ROUTER_FALLBACK_MODEL": {self.router_fallback_model}
            if self.router_fallback_model
            else set(),
        }
        for pool, policy in self.router_pools.items():
            named[f"ROUTER_POOLS[{pool}].models"] = set(policy.models or [])
        for pool, policy in self.router_pools.items():
            named[f"ROUTER_POOLS[{pool}].cascade_panel"] = set(policy.cascade_panel or [])
        for variable, models in named.items():
            unknown = models - known
            if unknown:
                raise ValueError(f"{variable} names models not in ROUTER_MODELS: {sorted(unknown)}")
        for pool, policy in self.router_pools.items():
            self._check_panel(pool, policy)
        return self

    def _check_panel(self, pool: str, policy: PoolPolicy) -> None:
        """A configured panel must be of the pool's models, leave one to escalate to,
        and (where prices are configured) not hold the pool's dearest model."""
        if not policy.cascade_panel:
            return
        models = policy.models or self.router_models
        variable = f"ROUTER_POOLS[{pool}].cascade_panel"
        outside = set(policy.cascade_panel) - set(models)
        if outside:
            raise ValueError(f"{variable} names models not in the pool: {sorted(outside)}")
        if set(models) <= set(policy.cascade_panel):
            raise ValueError(f"{variable} holds every model of the pool: none left to escalate to")
        prices = self.router_model_prices
        if all(m in prices for m in models):

            def price(model: str) -> float:
                return prices[model].input_per_mtok_usd + prices[model].output_per_mtok_usd

            dearest = max(price(m) for m in models)
            dear = [m for m in policy.cascade_panel if price(m) >= dearest]
            if dear:
                raise ValueError(
                    f"{variable} holds the pool's dearest model(s) {dear}: a panel probes "
                    "with cheap models"
                )

    @model_validator(mode="after")
    def _cascade_pools_can_have_a_panel(self) -> Settings:
        """A cascade probes with one model at least and escalates to another: a pool of
        one model could never be fitted (its fit failed at every router start)."""
        for pool, policy in self.router_pools.items():
            models = policy.models or self.router_models
            if policy.cascade and len(set(models)) < 2:
                raise ValueError(
                    f"ROUTER_POOLS[{pool}] is a cascade pool of {len(set(models))} model(s): "
                    "a cascade needs 2 at least, one to probe with and one to escalate to"
                )
        return self

    @property
    def cascade_deadline_check_seconds(self) -> float:
        """How often the router looks for probed queries past their deadline."""
        return min(self.cascade_probe_deadline_seconds / 4, 5.0)

    @model_validator(mode="after")
    def _a_reserve_outlives_its_probes(self) -> Settings:
        """A budget cascade pool's reserve must outlive the wait for its probes' answers:
        the probe deadline (counted from a query's first answer), the period of the
        deadline's check, and a window of each stage. Quality pools keep no reserve."""
        if not any(p.cascade and p.mode == "budget" for p in self.router_pools.values()):
            return self
        wait = (
            self.cascade_probe_deadline_seconds
            + self.cascade_deadline_check_seconds
            + 2 * self.router_window_seconds
        )
        if self.cascade_reserve_seconds <= wait:
            raise ValueError(
                f"CASCADE_RESERVE_SECONDS={self.cascade_reserve_seconds} must exceed {wait}: "
                "CASCADE_PROBE_DEADLINE_SECONDS, plus how often it is checked "
                "(a quarter of it, at most 5 s), plus 2 x ROUTER_WINDOW_SECONDS; a budget "
                "cascade pool's escalation reserve must outlive the wait for its probe answers"
            )
        return self

    @model_validator(mode="after")
    def _a_window_fits_in_a_rebalance(self) -> Settings:
        needed = self.router_window_seconds + self.router_solver_time_limit_seconds
        if self.rebalance_timeout_seconds() <= needed:
            raise ValueError(
                f"KAFKA_REBALANCE_TIMEOUT_SECONDS={self.kafka_rebalance_timeout_seconds} must "
                f"exceed ROUTER_WINDOW_SECONDS + ROUTER_SOLVER_TIME_LIMIT_SECONDS ({needed}): a "
                "router finishes its window before it hands its partitions over"
            )
        if self.rebalance_timeout_seconds() > MAX_REBALANCE_TIMEOUT_SECONDS:
            raise ValueError(
                f"the rebalance timeout of {self.rebalance_timeout_seconds()} s ("
                "KAFKA_REBALANCE_TIMEOUT_SECONDS, or when unset ROUTER_WINDOW_SECONDS + "
                "ROUTER_SOLVER_TIME_LIMIT_SECONDS + 2) is above Kafka's limit of "
                f"{MAX_REBALANCE_TIMEOUT_SECONDS} s (a 32-bit count of milliseconds)"
            )
        return self

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together")
        if self.kafka_security_protocol.endswith("SSL"):
            for variable, path in (
                ("KAFKA_SSL_CAFILE", self.kafka_ssl_cafile),
                ("KAFKA_SSL_CERTFILE", self.kafka_ssl_certfile),
                ("KAFKA_SSL_KEYFILE", self.kafka_ssl_keyfile),
            ):
                if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                    raise ValueError(f"{variable}={path}: no such readable file")
        return self

    @model_validator(mode="after")
    def _database_url_parses(self) -> Settings:
        """Checked here, not after the embedder has loaded (SQLAlchemy's traceback)."""
        if self.database_url and not is_database_url(self.database_url):
            raise ValueError(f"DATABASE_URL is not a database URL (e.g. {DATABASE_URL_EXAMPLE})")
        return self

    @model_validator(mode="after")
    def _default_pool_is_usable(self) -> Settings:
        try:
            self.pool_policy("default")
        except ValueError as exc:
            raise ValueError(
                f"ROUTER_MODE={self.router_mode} needs its limit, one only: "
                "ROUTER_WINDOW_BUDGET_USD, ROUTER_BUDGET_PER_HOUR_USD or "
                "ROUTER_BUDGET_PER_QUERY_USD (budget) or ROUTER_QUALITY_TARGET (quality) "
                f"({exc})"
            ) from None
        for pool in self.known_pools():
            models = self.pool_policy(pool).models or self.router_models
            capacity = sum(self.router_model_capacities.get(m, 10**12) for m in models)
            has_fallback = self.router_fallback_model in models
            if capacity < self.router_max_window_queries and not has_fallback:
                raise ValueError(
                    f"ROUTER_MODEL_CAPACITIES hold {capacity} queries per window of pool "
                    f"{pool!r}, fewer than ROUTER_MAX_WINDOW_QUERIES="
                    f"{self.router_max_window_queries}; raise them or set ROUTER_FALLBACK_MODEL "
                    "to one of the pool's models"
                )
        return self

    def topic_names(self) -> dict[str, str]:
        """Every topic the product uses, by role."""
        names = {
            "queries": f"{TOPIC_PREFIX}.queries",
            "predicted": f"{TOPIC_PREFIX}.predicted",
            # Cascade pools' probed queries with their probes' answers, keyed by pool.
            "probed": f"{TOPIC_PREFIX}.probed",
            # Faust changelog of the router's table of probe answers gathered so far.
            "probes_changelog": f"{ROUTER_APP_ID}-probes-changelog",
            # Faust changelog of the router's table of routed query ids.
            "routed_changelog": f"{ROUTER_APP_ID}-routed-changelog",
            # ... and of its table of what each pool's windows used up (time billed).
            "ledger_changelog": f"{ROUTER_APP_ID}-pool_ledger-changelog",
            "windows": f"{TOPIC_PREFIX}.windows",
            "outcomes": f"{TOPIC_PREFIX}.outcomes",
            "responses": f"{TOPIC_PREFIX}.responses",
            "deadletter": f"{TOPIC_PREFIX}.deadletter",
        }
        names.update({f"route:{m}": model_topic(m) for m in self.router_models})
        return names


class ConfigurationError(ValueError):
    """The environment's configuration is invalid; the message names each variable."""


# Fields whose values an error message must not repeat (the URL holds a password).
_SECRET_FIELDS = {"database_url", "judge_api_key", "openai_api_key", "kafka_sasl_password"}
_SETTINGS_FIELD = re.compile(r'field "(\w+)"')


def _variable(loc: tuple[int | str, ...]) -> str:
    """An error's location as its environment variable: ROUTER_POOLS[p].models."""
    if not loc:
        return ""
    name, *rest = loc
    if not isinstance(name, str) or name not in Settings.model_fields:
        return ".".join(str(part) for part in loc)
    variable = name.upper()
    if rest and name in ("router_pools", "router_model_prices", "router_model_priors",
                         "router_model_capacities", "openai_model_map"):  # fmt: skip
        variable += f"[{rest.pop(0)}]"
    return ".".join([variable, *(str(part) for part in rest)])


def load_settings() -> Settings:
    """Settings from the environment, or one ConfigurationError naming the environment
    variable of each problem (not pydantic's field names, nor a JSON parser's traceback)."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            variable = _variable(tuple(error["loc"]))
            if variable:
                shown = "" if error["loc"][0] in _SECRET_FIELDS else f" (got {error['input']!r})"
                message = f"{variable}: {message}{shown}"
            lines.append(message)
        raise ConfigurationError("invalid configuration:\n" + "\n".join(lines)) from None
    except SettingsError as exc:
        # Raised for a list or map variable whose value is not JSON.
        field = _SETTINGS_FIELD.search(str(exc))
        variable = field.group(1).upper() if field else "a variable"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigurationError(
            f"invalid configuration:\n{variable} is not valid JSON{cause} (a list is written "
            '["a", "b"], a map {"key": value})'
        ) from None


# The default pool's routing policy (Settings.pool_policy), the pools', and the
# capacities that bound them (capacities without a fallback can refuse a window).
POLICY_VARIABLES = frozenset(
    {
        "ROUTER_MODE",
        "ROUTER_WINDOW_BUDGET_USD",
        "ROUTER_BUDGET_PER_HOUR_USD",
        "ROUTER_BUDGET_PER_QUERY_USD",
        "ROUTER_QUALITY_TARGET",
        "ROUTER_POOLS",
        "ROUTER_MODEL_CAPACITIES",
        "ROUTER_FALLBACK_MODEL",
    }
)


def environment_for_workers(overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment of the workers a command starts under a routing policy of its
    own (the demo, the benchmarks): this process's, without POLICY_VARIABLES (in any
    case, as Settings reads them), then `overrides`. An exported budget beside the
    command's own was two budget limits, refused at start; an exported ROUTER_POOLS
    silently replaced its policy. The rest (broker security, cache dirs, ...) is kept."""
    inherited = {
        name: value for name, value in os.environ.items() if name.upper() not in POLICY_VARIABLES
    }
    return inherited | dict(overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
