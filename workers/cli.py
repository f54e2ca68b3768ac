"""The `omnirouter` command: one entry point for operators and developers."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy.engine import make_url

from workers.config import (
    DATABASE_URL_EXAMPLE,
    ConfigurationError,
    Settings,
    is_database_url,
    load_settings,
)

if TYPE_CHECKING:
    from workers.bench.cold_start_replay import ReplayRun
    from workers.routing.dataset import OutcomeTable
    from workers.routing.embedder import Embedder

T = TypeVar("T")

# Each role's default Prometheus port (METRICS_PORT overrides it).
ROUTER_METRICS_PORT, OUTCOMES_METRICS_PORT, MODEL_WORKER_METRICS_PORT = 9101, 9102, 9103
JUDGE_METRICS_PORT = 9104


class CommaSeparated(click.ParamType):
    """A comma-separated list of numbers of one kind, refused with a clear message."""

    name = "list"

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        try:
            return [self.kind(part) for part in str(value).split(",")]
        except ValueError:
            self.fail(
                f"{value!r} is not a comma-separated list of {self.kind.__name__}s", param, ctx
            )


data_option = click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="RouterBench-format file; default the shipped sample.",
)
# The replay judge of the cold-start benches: how much it scores, how often it errs.
judge_share_option = click.option(
    "--judge-share",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Share the judge scores.",
)
judge_flip_option = click.option(
    "--judge-flip",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Share of judge labels flipped.",
)
# A bench's queries, repeats or batches: 0 failed only after its run (IndexError,
# ZeroDivisionError, StatisticsError).
at_least_one = click.IntRange(min=1)
# A rate, latency or budget below 0 was silently unthrottled, or refused by the
# workers a bench starts (in their log files) while the bench waited for them.
non_negative = click.FloatRange(min=0.0)
# The workers a bench starts refuse ROUTER_WINDOW_SECONDS <= 0.
window_seconds_option = click.option(
    "--window-seconds",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
)


class _Commands(click.Group):
    """Every command's invalid configuration (its own load_settings, or a bench's) is
    one readable error naming the variables, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """OmniRouter-stream: route LLM queries in windows, at least cost for the quality asked."""


@main.command("config")
def show_config() -> None:
    """Print the configuration in force (from environment variables) as JSON,
    secrets masked (API keys, the SASL password, the database password)."""
    settings = load_settings()
    database_url = settings.database_url
    if database_url:
        url = make_url(database_url)
        # libpq also takes the password as a query parameter (?password=...).
        hidden = {k: "***" for k in url.query if k.lower() == "password"}
        database_url = url.update_query_dict(hidden).render_as_string(hide_password=True)
    click.echo(settings.model_copy(update={"database_url": database_url}).model_dump_json(indent=2))


@main.command()
@click.option("--port", type=int, default=9092, show_default=True, help="Port on 127.0.0.1.")
def broker(port: int) -> None:
    """Run the local memory-only Kafka-compatible broker until interrupted (SIGINT or
    SIGTERM), then stop it."""
    from workers.services import LocalBroker

    def stop_on_signal(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # Handlers, not a blocked mask for sigwait: the broker process would inherit the
    # mask and ignore the SIGTERM that stops it. (sigwait without one let SIGTERM's
    # default action end this process and leave the broker running.)
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    local = LocalBroker(port=port)
    try:  # a signal during start-up stops the broker too
        local.start()
        click.echo(f"broker listening on {local.bootstrap_servers}; Ctrl-C stops it")
        while True:
            signal.pause()
    finally:
        local.stop()


@main.group()
def topics() -> None:
    """Kafka topic administration."""


@topics.command("create")
@click.option("--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", required=True)
def topics_create(bootstrap_servers: str) -> None:
    """Create every topic with its partition count (idempotent); an existing topic the
    routers pair by partition of another count is reported, and nothing is created
    or changed."""
    from workers.stream.topics import create_topics

    result = _on_broker(
        create_topics(load_settings(), bootstrap_servers), bootstrap_servers, "create topics"
    )
    for topic, state in result.items():
        click.echo(f"{state:8s} {topic}")


@main.group()
def db() -> None:
    """Database schema management (Alembic)."""


@db.command("upgrade")
@click.option("--database-url", envvar="DATABASE_URL", required=True)
@click.option("--revision", default="head", show_default=True)
def db_upgrade(database_url: str, revision: str) -> None:
    """Apply migrations up to REVISION."""
    from workers.db import migrate

    if not is_database_url(database_url):  # read here, not through Settings
        raise click.BadParameter(
            f"not a database URL (e.g. {DATABASE_URL_EXAMPLE})",
            param_hint="--database-url / DATABASE_URL",
        )
    migrate.upgrade(database_url, revision)
    click.echo(f"database at {revision}")


@main.command()
@click.option("--since", default="24h", show_default=True, help="Period: 90s, 15m, 6h, 2d, 1w.")
@click.option(
    "--png",
    "png_path",
    type=click.Path(path_type=Path),
    default=Path("omnirouter-report.png"),
    show_default=True,
)
def report(since: str, png_path: Path) -> None:
    """Spend, realised quality and counts per pool and model, scores by source and
    the judge's spend, from PostgreSQL."""
    import sqlalchemy as sa

    from workers.report import (
        format_sources,
        format_table,
        parse_duration,
        plot,
        read_facts,
        summarise,
        summarise_sources,
    )

    settings = load_settings()
    if not settings.database_url:
        raise click.ClickException("DATABASE_URL is not set")
    try:
        period = parse_duration(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    facts = read_facts(sa.create_engine(settings.database_url), period)
    click.echo(f"outcomes stored in the last {since}: {len(facts)}")
    click.echo(format_table(summarise(facts)))
    click.echo("")
    click.echo(format_sources(summarise_sources(facts)))
    plot(facts, png_path)
    click.echo(f"spend and quality over time: {png_path}")


@main.command("export-schemas")
@click.option("--out", type=click.Path(path_type=Path), default=None)
def export_schemas(out: Path | None) -> None:
    """Write the JSON Schema of every event contract."""
    from schemas.export import SCHEMA_DIR, export

    for path in export(out or SCHEMA_DIR):
        click.echo(str(path))


def _configure_logging(level: str, log_format: str = "text") -> None:
    import logging.config

    from workers.logs import logging_config

    logging.config.dictConfig(logging_config(level, log_format))


def _need_bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise click.ClickException(
            "KAFKA_BOOTSTRAP_SERVERS is not set (run `omnirouter broker` for a local one)"
        )
    return settings.kafka_bootstrap_servers


def _on_broker(work: Coroutine[Any, Any, T], bootstrap: str, purpose: str) -> T:
    """Run a command's Kafka work; a broker out of reach is one line naming it and
    what the command wanted, as for every command, not aiokafka's traceback."""
    from aiokafka.errors import KafkaConnectionError

    try:
        return asyncio.run(work)
    except KafkaConnectionError as exc:
        raise click.ClickException(
            f"cannot reach the broker at {bootstrap} to {purpose}: {exc}"
        ) from exc


def _use_transactions(settings: Settings, bootstrap: str) -> bool:
    """KAFKA_TRANSACTIONS resolved against the broker (workers/stream/broker_features.py)."""
    from workers.stream.broker_features import TransactionsUnavailable, use_transactions

    try:
        transactions = _on_broker(
            use_transactions(settings, bootstrap),
            bootstrap,
            f"ask whether it has transactions (KAFKA_TRANSACTIONS={settings.kafka_transactions})",
        )
    except TransactionsUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    logging.getLogger(__name__).info(
        "fencing: %s",
        "Kafka transactions" if transactions else "generation-checked decisions, no transactions",
    )
    return transactions


def _embedder(settings: Settings, kind: str | None = None) -> Embedder:
    """The embedder of `kind`, else of ROUTER_EMBEDDER (the static one distilled into
    EMBEDDER_CACHE_DIR on first use)."""
    from workers.routing.embedder import make_embedder

    return make_embedder(kind or settings.router_embedder, Path(settings.embedder_cache_dir))


def _bench_embedder(settings: Settings) -> Embedder:
    """The router's embedder behind the benches' vector cache: the cold-start benches
    embed the same file for every run and every order of it."""
    from workers.routing.embedder import CachedEmbedder

    return CachedEmbedder(_embedder(settings), Path(".omnirouter/cache"))


embedder_option = click.option(
    "--embedder",
    "embedder_kind",
    type=click.Choice(["static", "minilm"]),
    default=None,
    help="Text -> vector; default ROUTER_EMBEDDER.",
)


@main.group()
def embedder() -> None:
    """The embedders (README "Configuration", ROUTER_EMBEDDER)."""


@embedder.command("build")
def embedder_build() -> None:
    """Distil the static embedder from the packaged MiniLM into EMBEDDER_CACHE_DIR,
    offline, unless it is there (`make` runs this)."""
    built = _embedder(load_settings(), "static")
    click.echo(f"static embedder ready: {built.name}, {built.dimension} dimensions")


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def router(loglevel: str) -> None:
    """Run a router worker: validate, predict, solve windows, publish assignments."""
    from workers.stream.app import bound_heap, run_worker
    from workers.stream.router import build_router_app
    from workers.stream.router_state import RouterState

    bound_heap()
    settings = load_settings()
    if not settings.database_url:
        click.echo("warning: DATABASE_URL is not set: the router will not learn from outcomes")
    _configure_logging(loglevel, settings.log_format)
    bootstrap = _need_bootstrap(settings)
    transactions = _use_transactions(settings, bootstrap)
    state = RouterState(settings, _embedder(settings), settings.database_url)
    asyncio.run(state.warm())  # the store is rebuilt before any query is predicted
    app = build_router_app(settings, bootstrap, state, transactions)
    run_worker(app, settings, ROUTER_METRICS_PORT, loglevel)


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def outcomes(loglevel: str) -> None:
    """Run the outcome writer: omnirouter.outcomes -> PostgreSQL."""
    from workers.stream.app import run_worker
    from workers.stream.outcomes import build_outcome_app

    settings = load_settings()
    if not settings.database_url:
        raise click.ClickException("DATABASE_URL is not set")
    _configure_logging(loglevel, settings.log_format)
    app = build_outcome_app(settings, _need_bootstrap(settings), settings.database_url)
    run_worker(app, settings, OUTCOMES_METRICS_PORT, loglevel)


def _replay_table(settings: Settings) -> OutcomeTable:
    """The recorded outcomes replay workers answer and judge from (REPLAY_DATA_PATH)."""
    path = Path(settings.replay_data_path) if settings.replay_data_path else None
    return _outcome_table(path, setting="REPLAY_DATA_PATH")


def _outcome_table(path: Path | None, setting: str | None = None) -> OutcomeTable:
    """A RouterBench-format file (default the shipped sample); one that is not is
    one line naming it and its line at fault (after the `setting` that named it),
    not DatasetError's traceback."""
    from workers.routing.dataset import DatasetError, load_routerbench, shipped_sample_path

    try:
        return load_routerbench(path or shipped_sample_path())
    except (DatasetError, OSError) as exc:
        raise click.ClickException(f"{setting}: {exc}" if setting else str(exc)) from exc


@main.group("model-worker")
def model_worker() -> None:
    """Workers that answer routed queries."""


@model_worker.command("replay")
@click.option("--model", "models", multiple=True, help="Repeatable; default every ROUTER_MODELS.")
@click.option("--loglevel", default="info", show_default=True)
def model_worker_replay(models: tuple[str, ...], loglevel: str) -> None:
    """Answer from recorded outcomes (REPLAY_DATA_PATH) after REPLAY_LATENCY_MS."""
    from workers.stream.app import run_worker
    from workers.stream.model_worker import build_model_worker_app
    from workers.stream.replay_worker import ReplayAnswerer

    settings = load_settings()
    _configure_logging(loglevel, settings.log_format)
    answerer = ReplayAnswerer(
        _replay_table(settings), settings.replay_latency_ms, settings.replay_scores
    )
    try:
        app = build_model_worker_app(
            "replay", settings, _need_bootstrap(settings), answerer, models or None
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    run_worker(app, settings, MODEL_WORKER_METRICS_PORT, loglevel)


@model_worker.command("openai")
@click.option("--model", "models", multiple=True, help="Repeatable; default every ROUTER_MODELS.")
@click.option("--loglevel", default="info", show_default=True)
def model_worker_openai(models: tuple[str, ...], loglevel: str) -> None:
    """Answer through an OpenAI-compatible API at OPENAI_BASE_URL."""
    from workers.stream.app import run_worker
    from workers.stream.model_worker import build_model_worker_app
    from workers.stream.openai_worker import ChatAnswerer

    settings = load_settings()
    _configure_logging(loglevel, settings.log_format)
    try:
        app = build_model_worker_app(
            "openai",
            settings,
            _need_bootstrap(settings),
            ChatAnswerer(settings),
            models or None,
            batch_size=settings.openai_max_concurrency,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    run_worker(app, settings, MODEL_WORKER_METRICS_PORT, loglevel)


@main.group()
def judge() -> None:
    """Workers that score a sample (JUDGE_SAMPLE_SHARE) of the answers on
    omnirouter.responses and publish the scores as outcomes."""


@judge.command("openai")
@click.option("--loglevel", default="info", show_default=True)
def judge_openai(loglevel: str) -> None:
    """Score through an OpenAI-compatible API at JUDGE_BASE_URL (JUDGE_RUBRIC)."""
    from workers.stream.app import run_worker
    from workers.stream.judge import build_judge_app, events_per_batch
    from workers.stream.judge_openai import ChatJudge

    settings = load_settings()
    try:
        chat = ChatJudge(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _configure_logging(loglevel, settings.log_format)
    batch = events_per_batch(settings.judge_max_concurrency, settings.judge_sample_share)
    app = build_judge_app("openai", settings, _need_bootstrap(settings), chat, batch)
    run_worker(app, settings, JUDGE_METRICS_PORT, loglevel)


@judge.command("replay")
@click.option("--loglevel", default="info", show_default=True)
def judge_replay(loglevel: str) -> None:
    """Score from recorded outcomes (REPLAY_DATA_PATH), JUDGE_FLIP_SHARE of them flipped."""
    from workers.stream.app import run_worker
    from workers.stream.judge import build_judge_app
    from workers.stream.judge_replay import ReplayJudge

    settings = load_settings()
    _configure_logging(loglevel, settings.log_format)
    replay_judge = ReplayJudge(_replay_table(settings), settings.judge_flip_share)
    app = build_judge_app("replay", settings, _need_bootstrap(settings), replay_judge)
    run_worker(app, settings, JUDGE_METRICS_PORT, loglevel)


@main.command()
@data_option
@click.option(
    "--rate",
    default=50.0,
    show_default=True,
    type=non_negative,
    help="Queries per second; 0: unthrottled.",
)
@click.option(
    "--limit", default=0, type=click.IntRange(0), help="At most this many queries; 0: all."
)
@click.option("--skip", default=0, type=click.IntRange(0), help="Start after this many rows.")
@click.option("--pool", default="default", show_default=True)
@click.option("--run-id", default=None, help="Prefix of the query ids; default a fresh one.")
def replay(
    data_path: Path | None, rate: float, limit: int, skip: int, pool: str, run_id: str | None
) -> None:
    """Produce QueryEvents from a RouterBench-format file."""
    import uuid

    from workers.stream.replay import produce_queries, query_events
    from workers.stream.security import aiokafka_options

    settings = load_settings()
    table = _outcome_table(data_path)
    rows = list(range(skip, len(table) if limit <= 0 else min(len(table), skip + limit)))
    queries = query_events(table.take(rows), run_id or f"replay-{uuid.uuid4().hex[:8]}", pool)
    bootstrap = _need_bootstrap(settings)
    seconds = _on_broker(
        produce_queries(
            bootstrap,
            settings.topic_names()["queries"],
            queries,
            rate,
            progress=lambda n: click.echo(f"produced {n}/{len(queries)}"),
            security=aiokafka_options(settings),
        ),
        bootstrap,
        "produce queries",
    )
    click.echo(f"produced {len(queries)} queries in {seconds:.1f}s")


@main.command("seed-outcomes")
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="RouterBench or generic file (.jsonl, .json, .csv); default the shipped sample.",
)
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["auto", "routerbench", "generic"]),
    default="auto",
    show_default=True,
    help="auto: RouterBench if the first JSON row has outcomes and prompt; CSV is generic.",
)
@click.option(
    "--limit", default=0, type=click.IntRange(0), help="At most this many prompts; 0: all."
)
@click.option(
    "--skip-unknown-models",
    is_flag=True,
    help="Leave out rows of models not in ROUTER_MODELS instead of refusing the file.",
)
def seed_outcomes_command(
    data_path: Path | None, file_format: str, limit: int, skip_unknown_models: bool
) -> None:
    """Store recorded outcomes as a warm start for the predictor: a RouterBench file
    (every model's outcome on a prompt a line) or a generic file of one row per
    prompt and model (text, model, score, cost, tokens, optional prompt_id)."""
    import sqlalchemy as sa

    from workers.routing import dataset
    from workers.stream.replay import seed_records

    settings = load_settings()
    if not settings.database_url:
        raise click.ClickException("DATABASE_URL is not set")
    try:
        records = dataset.load_seed_file(
            data_path or dataset.shipped_sample_path(),
            file_format,  # type: ignore[arg-type]
        )
    except dataset.DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    records, unknown = dataset.split_known_models(
        dataset.first_prompts(records, limit), settings.router_models
    )
    named = ", ".join(f"{m} ({n} row{'s' * (n != 1)})" for m, n in unknown.items())
    if unknown and not skip_unknown_models:
        raise click.ClickException(
            f"models not in ROUTER_MODELS: {named}; add them to ROUTER_MODELS "
            "or pass --skip-unknown-models"
        )
    if unknown:
        click.echo(f"skipped the rows of models not in ROUTER_MODELS: {named}")
    prompts = len({r.prompt_id for r in records})
    embedder = _embedder(settings)
    try:
        count = seed_records(
            sa.create_engine(settings.database_url),
            records,
            embedder,
            response_chars=settings.outcome_response_max_chars,
        )
    except sa.exc.DBAPIError as exc:  # the database away, or its schema not made
        cause = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise click.ClickException(
            f"cannot store the outcomes in DATABASE_URL's database ({cause}); is it up, "
            "and migrated (omnirouter db upgrade)?"
        ) from None
    click.echo(f"stored {count} outcomes of {prompts} prompts")


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path(".omnirouter"))
@click.option(
    "--warm-start",
    default=0,
    show_default=True,
    type=click.IntRange(0, 599),
    help="Store the recorded outcomes of this many sample prompts first (0: empty store).",
)
def demo(state_dir: Path, warm_start: int) -> None:
    """Run the whole loop locally on the shipped RouterBench sample, learning from a judge."""
    from workers.demo import run_demo

    sys.exit(run_demo(load_settings(), state_dir, warm_start))


@main.command()
@click.option(
    "--train",
    "train_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
)
@click.option(
    "--test",
    "test_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Without it: 5-fold cross-validation on --train.",
)
@click.option("--window-size", default=200, show_default=True, type=at_least_one)
@click.option(
    "--mode",
    "modes",
    type=click.Choice(["budget", "quality"]),
    multiple=True,
    help="Repeatable; default both.",
)
@click.option("--solver", type=click.Choice(["exact", "fast"]), default="exact", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("out/evaluation"),
    show_default=True,
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=Path(".omnirouter/cache"),
    show_default=True,
    help="Embeddings cached by text hash.",
)
@click.option(
    "--cascade/--no-cascade",
    default=True,
    show_default=True,
    help="Also route the answer-aware cascade (in each --mode: cascade_budget, "
    "cascade_quality) and the agreement rule, from the recorded responses.",
)
@embedder_option
def evaluate(
    train_path: Path,
    test_path: Path | None,
    window_size: int,
    modes: tuple[str, ...],
    solver: str,
    out_dir: Path,
    cache_dir: Path,
    cascade: bool,
    embedder_kind: str | None,
) -> None:
    """Route RouterBench-format outcomes offline; write report.json and cost_quality.png."""
    from workers.routing import evaluate as evaluation
    from workers.routing.embedder import CachedEmbedder

    train = _outcome_table(train_path)
    test = _outcome_table(test_path) if test_path else None
    settings = evaluation.EvaluationSettings(
        window_size=window_size,
        modes=tuple(modes) or ("budget", "quality"),  # type: ignore[arg-type]
        solver=solver,  # type: ignore[arg-type]
        cascade=cascade,
    )
    embedder = CachedEmbedder(_embedder(load_settings(), embedder_kind), cache_dir)
    click.echo(f"embedder: {embedder.name}")
    report = evaluation.evaluate(train, test, embedder, settings, progress=click.echo)
    click.echo(evaluation.summary_table(report))
    for path in evaluation.write_outputs(report, out_dir):
        click.echo(f"wrote {path}")


@main.group()
def bench() -> None:
    """Benchmarks that print their figures."""


@bench.command("solver")
@click.option(
    "--sizes", default="100,500,1000,2000,5000", show_default=True, type=CommaSeparated(int)
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=at_least_one,
    help="Instances per size; median time.",
)
@click.option("--with-capacities/--no-capacities", default=False, show_default=True)
def bench_solver(sizes: list[int], repeats: int, with_capacities: bool) -> None:
    """Exact ILP vs fast path: median solve time and the fast path's objective gap."""
    from workers.bench import solver

    window_sizes = tuple(sizes)
    header = (
        f"{'queries':>7} {'models':>6} {'mode':>7} {'exact s':>9} {'fast ms':>9} "
        f"{'gap % (worst)':>13} {'exact status':>14} {'fast feasible':>13}"
    )
    click.echo(header)
    for row in solver.run(window_sizes, repeats, with_capacities=with_capacities):
        click.echo(
            f"{row.n_queries:>7} {11:>6} {row.mode:>7} {row.exact_median_seconds:>9.3f} "
            f"{row.fast_median_seconds * 1000:>9.2f} {row.gap_percent_worst:>13.4f} "
            f"{row.exact_status:>14} {row.fast_feasible!s:>13}"
        )


@bench.command("solver-fuzz")
@click.option("--windows", default=4000, show_default=True, type=at_least_one)
@click.option("--seed", default=0, show_default=True)
def bench_solver_fuzz(windows: int, seed: int) -> None:
    """Fast path vs exact ILP on small random windows: how often and how far worse."""
    from workers.bench import solver_fuzz

    click.echo(
        f"{'caps':>5} {'mode':>7} {'windows':>7} {'compared':>8} {'>1% worse':>9} "
        f"{'>10% worse':>10} {'worst %':>8} {'mean %':>7} {'broken':>6}"
    )
    for row in solver_fuzz.run(windows, seed):
        click.echo(
            f"{'yes' if row.capped else 'no':>5} {row.mode:>7} {row.windows:>7} "
            f"{row.compared:>8} {row.over_1_percent:>9} {row.over_10_percent:>10} "
            f"{100 * row.worst_gap:>8.1f} {100 * row.mean_gap:>7.2f} {row.broken:>6}"
        )


@bench.command("pipeline")
@click.option("--queries", default=20_000, show_default=True, type=at_least_one)
@click.option("--outcomes-in-store", default=100_000, show_default=True)
@window_seconds_option
@click.option("--routers", default=1, show_default=True, type=click.IntRange(1, 16))
@embedder_option
def bench_pipeline(
    queries: int,
    outcomes_in_store: int,
    window_seconds: float,
    routers: int,
    embedder_kind: str | None,
) -> None:
    """Throughput vs raw embedding, produce->assignment latency, router peak memory;
    with --routers N, of N router processes in one consumer group."""
    from workers.bench import pipeline

    figures = pipeline.run(
        queries,
        outcomes_in_store,
        window_seconds,
        routers,
        embedder_kind or load_settings().router_embedder,
        progress=click.echo,
    )
    share = figures.pipeline_qps / figures.raw_embedding_qps
    click.echo("")
    click.echo(f"embedder                      {figures.embedder}")
    for kind, rate in figures.raw_embedding_qps_by_embedder.items():
        click.echo(f"raw embedding, {kind:<15}{rate:8.0f} short queries/s")
    click.echo(
        f"raw embedding throughput      {figures.raw_embedding_qps:8.0f} queries/s "
        f"(mean of {figures.raw_embedding_qps_before:.0f} before and "
        f"{figures.raw_embedding_qps_after:.0f} after the pipeline)"
    )
    click.echo(
        f"pipeline throughput, steady   {figures.pipeline_qps:8.0f} queries/s ({share:.0%} of raw)"
    )
    click.echo(
        f"pipeline throughput, burst    {figures.burst_qps:8.0f} queries/s "
        f"({figures.burst_qps / figures.raw_embedding_qps:.0%} of raw; includes one window's wait)"
    )
    click.echo(
        f"latency p50 / p99             {figures.latency_p50_seconds:8.2f} / "
        f"{figures.latency_p99_seconds:.2f} s (window {figures.window_seconds:.1f} s)"
    )
    click.echo(
        f"router peak RSS               {figures.router_peak_rss_mb:8.0f} MB "
        f"with {figures.outcomes_in_store} outcomes in the store "
        f"(the largest of {figures.routers} router(s))"
    )
    click.echo(
        f"router CPU per query          {figures.router_cpu_ms_per_query:8.2f} ms "
        f"(one core of routers: {1000 / figures.router_cpu_ms_per_query:.0f} queries/s)"
    )
    window = figures.window_seconds
    click.echo(
        f"targets: steady >= 2000/s {'met' if figures.pipeline_qps >= 2000 else 'MISSED'}; "
        f"p99 < window + 1 s {'met' if figures.latency_p99_seconds < window + 1 else 'MISSED'}; "
        f"RSS < 600 MB {'met' if figures.router_peak_rss_mb < 600 else 'MISSED'}"
    )


@bench.command("cascade")
@click.option("--queries", default=300, show_default=True, type=at_least_one)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=non_negative,
    help="Queries produced per second.",
)
@window_seconds_option
@click.option("--model-latency-ms", default=200.0, show_default=True, type=non_negative)
@click.option(
    "--budget-per-query", default=0.0018, show_default=True, type=non_negative, help="USD."
)
@click.option(
    "--quality-target",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Route the pool in quality mode at this mean quality (default: budget mode).",
)
def bench_cascade(
    queries: int,
    rate: float,
    window_seconds: float,
    model_latency_ms: float,
    budget_per_query: float,
    quality_target: float | None,
) -> None:
    """Produce -> final answer latency of a cascade pool's direct, accepted-probe and
    escalated queries (replay models on the shipped sample)."""
    from workers.bench import cascade

    figures = cascade.run(
        queries,
        rate,
        window_seconds,
        model_latency_ms,
        budget_per_query,
        progress=click.echo,
        quality_target=quality_target,
    )
    click.echo("")
    for kind, latency in figures.latency.items():
        click.echo(
            f"{kind:<16}{latency.count:5d} queries  latency p50 / p99 "
            f"{latency.p50_seconds:6.2f} / {latency.p99_seconds:.2f} s"
        )
    if figures.budget_usd is not None:
        limit = f"of ${figures.budget_usd:.4f}"
    else:
        limit = (
            f"at a first-stage predicted quality of {figures.first_stage_quality:.4f} "
            f"(target {figures.quality_target:.2f}; {figures.windows_short_of_target} of "
            f"{figures.first_stage_windows} windows could not reach it)"
        )
    click.echo(
        f"probed {figures.probed}, escalated {figures.escalated}; predicted spend "
        f"${figures.spend_usd:.4f} {limit} "
        f"(window {window_seconds:.1f} s, models answer in {model_latency_ms:.0f} ms)"
    )


@bench.command("accuracy")
@data_option
@click.option(
    "--warm",
    "warm_prompts",
    default=300,
    show_default=True,
    type=at_least_one,
    help="Prompts whose outcomes warm the store; the rest are replayed.",
)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=non_negative,
    help="Replayed queries per second.",
)
def bench_accuracy(data_path: Path | None, warm_prompts: int, rate: float) -> None:
    """Routed accuracy and cost through Kafka vs the offline evaluation, same budget."""
    from workers.bench import accuracy
    from workers.routing.dataset import shipped_sample_path

    path = data_path or shipped_sample_path()
    table = _outcome_table(path)
    if warm_prompts >= len(table):  # nothing left to replay: IndexError after the run
        raise click.BadParameter(
            f"{warm_prompts} leaves none of the file's {len(table)} prompts to replay",
            param_hint="--warm",
        )
    figures = accuracy.run(table, path, warm_prompts, rate_per_second=rate)
    click.echo(f"prompts scored                {figures.prompts}")
    click.echo(f"budget per query              ${figures.budget_per_query_usd:.6f}")
    click.echo(f"mean window (streamed)        {figures.mean_window_queries:.1f} queries")
    click.echo(f"{'':30s}{'accuracy':>9} {'cost USD':>10}")
    for label, accuracy_, cost in (
        ("streamed through Kafka", figures.streamed_accuracy, figures.streamed_cost_usd),
        ("offline, same windows/budget", figures.offline_accuracy, figures.offline_cost_usd),
    ):
        click.echo(f"{label:30s}{accuracy_:9.4f} {cost:10.4f}")
    gap = 100 * (figures.streamed_accuracy - figures.offline_accuracy)
    click.echo(f"difference                    {gap:+.2f} points")


@bench.command("predictor")
@click.option("--outcomes-in-store", default=100_000, show_default=True)
@click.option(
    "--batches",
    default=40,
    show_default=True,
    type=at_least_one,
    help="Micro-batches of ROUTER_PREDICT_BATCH.",
)
@click.option("--profile/--no-profile", default=False, help="Add cProfile's top functions.")
@embedder_option
def bench_predictor(
    outcomes_in_store: int, batches: int, profile: bool, embedder_kind: str | None
) -> None:
    """CPU time per query of the router's predictor thread, by stage (short queries)."""
    from workers.bench import predictor
    from workers.bench.pipeline import short_queries

    settings = load_settings()
    texts = [q.text for q in short_queries(1000, "bench")]
    bench = predictor.prepare(
        settings, _embedder(settings, embedder_kind), texts, outcomes_in_store, batches
    )
    click.echo(
        f"{bench.queries} queries in batches of {settings.router_predict_batch}, "
        f"{outcomes_in_store} outcomes in the store"
    )
    for stage, ms in predictor.cpu_ms_per_query(bench).items():
        click.echo(f"{stage:<36}{ms:8.4f} ms CPU per query")
    if profile:
        click.echo(predictor.profile(bench))


@bench.command("cold-start")
@data_option
@click.option(
    "--queries", default=2000, show_default=True, type=at_least_one, help="Queries streamed."
)
@judge_share_option
@judge_flip_option
@click.option(
    "--rate", default=10.0, show_default=True, type=non_negative, help="Queries per second."
)
@click.option(
    "--png",
    "png_path",
    type=click.Path(path_type=Path),
    default=Path("out/cold_start.png"),
    show_default=True,
)
def bench_cold_start(
    data_path: Path | None,
    queries: int,
    judge_share: float,
    judge_flip: float,
    rate: float,
    png_path: Path,
) -> None:
    """Learning from an empty store through Kafka: replay models, the replay judge,
    budget mode; per block of 250 queries beside a warm-started router."""
    from workers.bench import cold_start
    from workers.routing.dataset import shipped_sample_path

    path = data_path or shipped_sample_path()
    table = _outcome_table(path)
    # The warm-started reference predicts with the router's own embedder.
    embedder = _bench_embedder(load_settings())
    figures = cold_start.run(
        table, path, embedder, queries, judge_share, judge_flip,
        rate_per_second=rate, progress=click.echo,
    )  # fmt: skip
    budget = figures.budget_per_query_usd
    click.echo(
        f"budget per query ${budget:.6f}; exploration share {figures.exploration_share}; "
        f"shadow share {figures.shadow_share}"
    )
    click.echo(f"windows {figures.windows}; judge spend ${figures.judge_spend_usd:.4f}")
    spend = sum(b.cost_usd for b in figures.blocks)
    click.echo(
        f"run spend ${spend:.4f} of budget ${sum(figures.budget_per_block):.4f}; budget given "
        f"up to repay realised over predicted spend ${figures.spend_correction_usd:.4f}"
    )
    click.echo(
        f"{'queries':>11} {'accuracy':>8} {'warm':>6} {'single':>6} {'cost $':>8} "
        f"{'warm $':>8} {'budget $':>8} {'explore $':>9} {'shadow $':>8} {'scored':>6}  "
        "top model share"
    )
    for block, block_budget in zip(figures.blocks, figures.budget_per_block, strict=True):
        top = max(block.share_per_model, key=lambda m: block.share_per_model[m])
        click.echo(
            f"{block.first + 1:>5}-{block.first + block.queries:<5} {block.accuracy:8.4f} "
            f"{block.warm_accuracy:6.4f} {block.best_single_accuracy:6.4f} "
            f"{block.cost_usd:8.4f} {block.warm_cost_usd:8.4f} {block_budget:8.4f} "
            f"{block.exploration_spend_usd:9.4f} {block.shadow_spend_usd:8.4f} "
            f"{block.scored_so_far:6d}  "
            f"{top} {block.share_per_model[top]:.0%}"
        )
    first, last = figures.blocks[0], figures.blocks[-1]
    click.echo(
        "predicted spend per block: "
        + " ".join(f"{b.predicted_cost_usd:.4f}" for b in figures.blocks)
    )
    click.echo(f"{'last block: model':40s} {'believed':>8} {'actual':>7}")
    for model, believed in last.believed.items():
        click.echo(f"  {model:38s} {believed:8.3f} {last.actual[model]:7.3f}")
    click.echo(f"priors alone, block 1: {figures.priors_alone_share}")
    click.echo(f"block 1 shares:        {first.share_per_model}")
    explored = sum(b.exploration_spend_usd for b in figures.blocks)
    shadowed = sum(b.shadow_spend_usd for b in figures.blocks)
    total_budget = sum(figures.budget_per_block)
    click.echo(
        f"targets: block 1 spend {first.cost_usd:.4f} <= budget {figures.budget_per_block[0]:.4f}: "
        f"{first.cost_usd <= figures.budget_per_block[0]}; last block {last.accuracy:.4f} vs warm "
        f"{last.warm_accuracy:.4f} ({100 * (last.accuracy - last.warm_accuracy):+.1f} points) "
        f"at ${last.cost_usd:.4f} vs ${last.warm_cost_usd:.4f}; exploration "
        f"{explored / max(total_budget, 1e-12):.1%} of the budget "
        f"(share {figures.exploration_share:.0%}); shadow answers "
        f"{sum(b.shadow_queries for b in figures.blocks)}, "
        f"{shadowed / max(total_budget, 1e-12):.1%} "
        f"of the budget (share {figures.shadow_share:.0%}); spend includes shadows"
    )
    click.echo(f"learning curve: {cold_start.plot(figures, png_path)}")


@bench.command("cold-start-replay")
@data_option
@click.option(
    "--queries", default=2000, show_default=True, type=at_least_one, help="Queries per order."
)
@judge_share_option
@judge_flip_option
@click.option(
    "--seeds",
    default=16,
    show_default=True,
    type=at_least_one,
    help="Orders of the queries replayed: seeds 0 to N-1 (seed 0 is the live bench's).",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    default=Path("out/cold_start_replay.jsonl"),
    show_default=True,
    help="One JSON line per seed, to compare two versions of the code seed by seed.",
)
@click.option(
    "--against",
    "against_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An earlier run's --out file: also print this run less that one, seed by seed.",
)
def bench_cold_start_replay(
    data_path: Path | None,
    queries: int,
    judge_share: float,
    judge_flip: float,
    seeds: int,
    out_path: Path,
    against_path: Path | None,
) -> None:
    """The learning loop of `bench cold-start` offline, over many orders of the
    queries: the last block against the warm-started router, seed by seed."""
    from workers.bench.cold_start_replay import ReplaySummary, replay

    # Read first: --out may name the same file.
    against = _replay_runs(against_path, seeds) if against_path is not None else None
    settings = load_settings()
    table = _outcome_table(data_path)
    embedder = _bench_embedder(settings)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with out_path.open("w") as out:
        for seed in range(seeds):
            run = replay(table, embedder, settings, seed, queries, judge_share, judge_flip)
            runs.append(run)
            out.write(run.to_json() + "\n")
            last = run.blocks[-1]
            click.echo(
                f"seed {seed:3d}: accuracy per block "
                + " ".join(f"{b.accuracy:.3f}" for b in run.blocks)
                + f"; last block {run.last_block_gap_points:+.1f} points vs warm at "
                f"${last.cost_usd:.4f} vs ${last.warm_cost_usd:.4f}"
            )
    summary = ReplaySummary.of(runs)
    click.echo(
        f"last block vs the warm-started router: {summary.mean_gap_points:+.2f} points "
        f"(s.e. {summary.standard_error_points:.2f}), within 2 points in "
        f"{summary.within_two_points} of {summary.seeds}; last 1,000 queries "
        f"{summary.last_blocks_gap_points:+.2f}; last block's spend "
        f"{summary.spend_of_warm:.3f} of the warm router's"
    )
    click.echo(f"wrote {out_path}")
    if against_path is not None and against is not None:
        _echo_paired_difference(runs, against, against_path)


def _replay_runs(path: Path, seeds: int) -> list[ReplayRun]:
    """The --against file's runs, refused before the replay (minutes) when it is not
    a replay output or holds none of the seeds 0 to seeds-1 this run will replay."""
    from workers.bench.cold_start_replay import read_runs

    try:
        runs = read_runs(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(
            f"--against {path}: not a cold-start-replay output ({exc})"
        ) from exc
    if not any(run.seed < seeds for run in runs):
        raise click.ClickException(
            f"--against {path}: holds none of seeds 0 to {seeds - 1}, nothing to pair"
        )
    return runs


def _echo_paired_difference(
    runs: list[ReplayRun], against: list[ReplayRun], against_path: Path
) -> None:
    from workers.bench.cold_start_replay import PairedDifference

    try:
        paired = PairedDifference.of(runs, against)
    except ValueError as exc:
        raise click.ClickException(f"--against {against_path}: {exc}") from exc
    click.echo(
        f"against {against_path}, paired over {paired.seeds} seeds: last block "
        f"{paired.last_block_points:+.2f} points (s.e. {paired.last_block_error:.2f}); "
        f"last 1,000 queries {paired.later_blocks_points:+.2f} "
        f"(s.e. {paired.later_blocks_error:.2f}); per block "
        + " ".join(f"{p:+.2f}" for p in paired.per_block_points)
        + f"; last block's spend {paired.spend_ratio:.3f} of that run's"
    )


@bench.command("signal")
@data_option
@click.option(
    "--auc",
    "aucs",
    default="0.5,0.55,0.6,0.65,0.7,0.75,0.8",
    show_default=True,
    type=CommaSeparated(float),
    help="Within-task AUCs of the synthetic predictor, comma-separated.",
)
@click.option("--window-size", default=200, show_default=True, type=at_least_one)
def bench_signal(data_path: Path | None, aucs: list[float], window_size: int) -> None:
    """Routing targets vs predictor strength: cross-validated routing with synthetic
    quality estimates of a chosen within-task AUC (see workers/bench/signal.py)."""
    from workers.bench import signal

    try:
        figures = signal.run(_outcome_table(data_path), aucs, window_size)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    best, cheapest = figures[0].best_model, figures[0].cheapest_model
    click.echo("margin: points of accuracy over a model at that model's own cost")
    click.echo(f"best model: {best}; cheapest: {cheapest}")
    click.echo(
        f"{'AUC':>5} {'measured':>8} {'AIQ':>7} {'acc @35%':>8} {'reach at':>9} "
        f"{'margin best':>11} {'cheapest':>9} {'least':>6}  of model"
    )
    for row in figures:
        margins = {m: v for m, v in row.margin_at_each_model_cost.items() if v is not None}
        weakest = min(margins, key=lambda m: margins[m])
        at_35 = row.accuracy_at_35pct_of_best_model_cost
        reach = row.cost_share_to_reach_best_model_accuracy
        click.echo(
            f"{row.auc_requested:5.2f} {row.auc_measured:8.3f} {row.aiq:7.4f} "
            f"{'-' if at_35 is None else f'{at_35:.4f}':>8} "
            f"{'never' if reach is None else f'{reach:.0%}':>9} "
            f"{100 * margins.get(best, float('nan')):+11.1f} "
            f"{100 * margins.get(cheapest, float('nan')):+9.1f} "
            f"{100 * margins[weakest]:+6.1f}  {weakest}"
        )


@bench.command("agreement")
@data_option
@click.option(
    "--cost-shares",
    "shares",
    default="0.2,0.35,0.5,0.75,1.0",
    show_default=True,
    type=CommaSeparated(float),
    help="Budgets as shares of the dearest model's total cost, comma-separated.",
)
@click.option(
    "--probes",
    default=6,
    show_default=True,
    type=click.IntRange(min=2),
    help="Probe pairs are drawn from this many of the cheapest models.",
)
def bench_agreement(data_path: Path | None, shares: list[float], probes: int) -> None:
    """The most accuracy answer agreement can buy: an in-sample upper bound over
    single models, agreeing probe pairs and sequential majorities, mixed per task
    (see workers/bench/agreement.py)."""
    from workers.bench import agreement

    try:
        bound = agreement.run(_outcome_table(data_path), shares, probes)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in agreement.report_lines(bound):
        click.echo(line)


if __name__ == "__main__":
    main()
