"""The `omnirouter` command: one entry point for operators and developers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from workers.config import Settings


def load_settings() -> Settings:
    """Settings from the environment, or a readable error instead of a traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """OmniRouter-stream: route LLM queries in windows, at least cost for the quality asked."""


@main.command("config")
def show_config() -> None:
    """Print the configuration in force (from environment variables) as JSON."""
    click.echo(load_settings().model_dump_json(indent=2))


@main.command()
@click.option("--port", type=int, default=9092, show_default=True, help="Port on 127.0.0.1.")
def broker(port: int) -> None:
    """Run the local memory-only Kafka-compatible broker until interrupted."""
    from workers.services import LocalBroker

    local = LocalBroker(port=port).start()
    click.echo(f"broker listening on {local.bootstrap_servers}; Ctrl-C stops it")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        local.stop()


@main.group()
def topics() -> None:
    """Kafka topic administration."""


@topics.command("create")
@click.option("--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", required=True)
def topics_create(bootstrap_servers: str) -> None:
    """Create every topic with its partition count (idempotent)."""
    from workers.stream.topics import create_topics

    result = asyncio.run(create_topics(load_settings(), bootstrap_servers))
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

    migrate.upgrade(database_url, revision)
    click.echo(f"database at {revision}")


@main.command("export-schemas")
@click.option("--out", type=click.Path(path_type=Path), default=None)
def export_schemas(out: Path | None) -> None:
    """Write the JSON Schema of every event contract."""
    from schemas.export import SCHEMA_DIR, export

    for path in export(out or SCHEMA_DIR):
        click.echo(str(path))


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path(".omnirouter"))
def demo(state_dir: Path) -> None:
    """Run the whole loop locally on the shipped RouterBench sample."""
    from workers.demo import run_demo

    sys.exit(run_demo(load_settings(), state_dir))


def _echo_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
