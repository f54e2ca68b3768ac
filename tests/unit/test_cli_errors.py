"""Commands a new user runs first fail in one line naming what is wrong."""

from __future__ import annotations

import socket
import subprocess

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
