"""Commands a new user runs first fail in one line naming what is wrong."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from workers import services
from workers.cli import main


def closed_port() -> str:
    """A loopback address nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("command", "purpose"),
    [(["topics", "create"], "create topics"), (["replay", "--limit", "1"], "produce queries")],
)
def test_a_broker_out_of_reach_is_one_line(
    monkeypatch: pytest.MonkeyPatch, command: list[str], purpose: str
) -> None:
    """aiokafka's traceback before; now the router's one line, naming the address."""
    address = closed_port()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", address)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 1, result.output
    assert f"Error: cannot reach the broker at {address} to {purpose}" in result.output
    assert result.exc_info is not None and result.exc_info[0] is SystemExit


@pytest.mark.parametrize("option", ["--skip", "--limit"])
def test_replay_refuses_negative_counts(option: str) -> None:
    """numpy's negative indexing made --skip -1 replay from the last row."""
    result = CliRunner().invoke(main, ["replay", option, "-1"])
    assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.output


def test_a_docker_engine_that_hangs_counts_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker info` past its timeout raised TimeoutExpired out of every command that
    looks for a local service, instead of going on without Docker."""

    def hangs(command: list[str], **options: object) -> None:
        raise subprocess.TimeoutExpired(command, 10)

    monkeypatch.setattr(services.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(services.subprocess, "run", hangs)
    assert services.docker_available() is False


@pytest.fixture
def bad_data(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["replay", "--data", "{bad}"],
        ["bench", "accuracy", "--data", "{bad}"],
        ["bench", "cold-start", "--data", "{bad}"],
        ["bench", "cold-start-replay", "--data", "{bad}", "--seeds", "1"],
        ["replay", "--data", "{dir}"],
        ["bench", "signal", "--data", "{dir}"],
        ["evaluate", "--train", "{dir}"],
    ],
)
def test_a_data_file_that_is_no_outcome_file_is_one_line(
    monkeypatch: pytest.MonkeyPatch, bad_data: Path, command: list[str]
) -> None:
    """A malformed --data file was DatasetError's traceback (replay and three benches),
    a directory IsADirectoryError's (every command with --data, evaluate's --train)."""
    monkeypatch.setattr("workers.cli._bench_embedder", lambda settings: None)
    args = [a.format(bad=bad_data, dir=bad_data.parent) for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2), result.output
    assert result.exc_info is not None and result.exc_info[0] is SystemExit, result.exc_info
    assert "not a RouterBench row" in result.output or "is a directory" in result.output


def ran(*args: object, **kwargs: object) -> None:
    raise AssertionError("the command ran with a value it should have refused")


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["bench", "cold-start", "--queries", "0"], "--queries"),
        (["bench", "cold-start-replay", "--queries", "0"], "--queries"),
        (["bench", "cascade", "--queries", "0"], "--queries"),
        (["bench", "pipeline", "--queries", "0"], "--queries"),
        (["bench", "cold-start", "--judge-share", "1.5"], "--judge-share"),
        (["bench", "cold-start-replay", "--judge-flip", "-0.1"], "--judge-flip"),
        (["bench", "cold-start", "--rate", "-1"], "--rate"),
        (["bench", "cascade", "--window-seconds", "0"], "--window-seconds"),
        (["bench", "pipeline", "--window-seconds", "-1"], "--window-seconds"),
        (["bench", "cascade", "--model-latency-ms", "-5"], "--model-latency-ms"),
        (["bench", "cascade", "--budget-per-query", "-0.1"], "--budget-per-query"),
        (["bench", "solver", "--repeats", "0"], "--repeats"),
        (["bench", "predictor", "--batches", "0"], "--batches"),
        (["bench", "accuracy", "--warm", "0"], "--warm"),
        (["bench", "accuracy", "--warm", "600"], "--warm"),
        (["replay", "--rate", "-5"], "--rate"),
    ],
)
def test_a_bench_value_that_cannot_run_is_refused_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, command: list[str], option: str
) -> None:
    """Each ran first: --queries 0 ended in IndexError or ZeroDivisionError after the
    run (cold-start's, pipeline's after a broker, a database and workers had started),
    --repeats 0 in StatisticsError, --batches 0 in ZeroDivisionError, --warm 600 (the
    whole sample) in IndexError; --judge-share 1.5, --window-seconds 0, a negative
    latency or budget were refused by the workers the bench starts (in their log files)
    while the bench waited, and a negative --rate was silently unthrottled."""
    from workers.bench import (
        accuracy,
        cascade,
        cold_start,
        cold_start_replay,
        pipeline,
        predictor,
        solver,
    )

    for module, name in (
        (accuracy, "run"), (cascade, "run"), (cold_start, "run"), (pipeline, "run"),
        (solver, "run"), (predictor, "prepare"), (cold_start_replay, "replay"),
    ):  # fmt: skip
        monkeypatch.setattr(module, name, ran)
    monkeypatch.setattr("workers.cli._bench_embedder", lambda settings: None)
    monkeypatch.setattr("workers.cli._embedder", lambda settings, kind=None: None)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, (result.output, result.exc_info)
    assert option in result.output


def test_db_upgrade_names_a_malformed_database_url() -> None:
    """`db upgrade` reads DATABASE_URL itself (not through Settings): a URL that does
    not parse was SQLAlchemy's ArgumentError traceback."""
    result = CliRunner().invoke(
        main, ["db", "upgrade", "--database-url", "user:db-pass-456@localhost:5432/omnirouter"]
    )
    assert result.exit_code == 2, (result.output, result.exc_info)
    assert "DATABASE_URL" in result.output and "not a database URL" in result.output
    assert "db-pass-456" not in result.output


def test_report_refuses_a_period_no_date_can_hold(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--since 99999999999w was OverflowError's traceback (the period overflows a
    timedelta; a shorter absurd one, the cutoff's date)."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'report.db'}")
    for since in ("99999999999w", "200000w"):
        result = CliRunner().invoke(main, ["report", "--since", since])
        assert result.exit_code == 2, (result.output, result.exc_info)
        assert "--since" in result.output


class ZeroEmbedder:
    """Vectors that say nothing: the command's failure comes after embedding."""

    name = "zero"

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[0.0] * 4 for _ in texts]


def test_seed_outcomes_with_the_database_out_of_reach_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole upsert statement's traceback before (the database down, or not
    migrated); now one line saying what to check."""
    monkeypatch.setattr("workers.cli._embedder", lambda settings: ZeroEmbedder())
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg://nobody@{closed_port()}/none")
    result = CliRunner().invoke(main, ["seed-outcomes", "--limit", "2"])
    assert result.exit_code == 1, result.output
    assert "Error: cannot store the outcomes in DATABASE_URL's database" in result.output
    assert result.exc_info is not None and result.exc_info[0] is SystemExit
