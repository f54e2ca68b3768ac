"""docker-compose.yml parses and only runs commands the CLI really has."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from workers.cli import main

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def resolve(command: list[str]) -> click.Command:
    """Walk the click groups along `command`; raise if a word is not a subcommand."""
    current: click.Command = main
    for word in command:
        if word.startswith("-") or not isinstance(current, click.Group):
            break
        found = current.get_command(click.Context(current), word)
        assert found is not None, f"`omnirouter {' '.join(command)}`: no subcommand {word!r}"
        current = found
    return current


def test_compose_parses_and_wires_kafka_and_postgres() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "postgres"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert services["postgres"]["image"] == "postgres:16"


def test_every_worker_command_exists_in_the_cli() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    workers = {name: s for name, s in services.items() if "command" in s and "build" in s}
    assert workers, "no omnirouter services in docker-compose.yml"
    for name, service in workers.items():
        assert "KAFKA_BOOTSTRAP_SERVERS" in service["environment"], name
        resolved = resolve(service["command"])
        assert not isinstance(resolved, click.Group), f"{name}: {service['command']} is a group"
