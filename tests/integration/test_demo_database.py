"""Every demo starts from an empty store: its own database is emptied at start
(a second `make demo` once found the first run's outcomes and was warm)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from workers import services
from workers.services import LOCAL_POSTGRES_ADMIN_URL, demo_database_url, drop_database


def table_names(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def leave_a_table(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE earlier_run (x integer)"))
    engine.dispose()


def test_the_demo_empties_its_own_postgres_database(tmp_path: Path) -> None:
    if not services.local_postgres_answers():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = f"omnirouter_demo_test_{uuid.uuid4().hex[:8]}"
    try:
        leave_a_table(demo_database_url("", tmp_path, name))
        assert table_names(demo_database_url("", tmp_path, name)) == []
    finally:
        drop_database(LOCAL_POSTGRES_ADMIN_URL, name)


def test_the_demo_empties_its_own_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "local_postgres_answers", lambda: False)
    leave_a_table(demo_database_url("", tmp_path))
    assert table_names(demo_database_url("", tmp_path)) == []


def test_a_configured_database_is_used_as_it_is(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'users.db'}"
    leave_a_table(url)
    assert demo_database_url(url, tmp_path) == url
    assert table_names(url) == ["earlier_run"]
