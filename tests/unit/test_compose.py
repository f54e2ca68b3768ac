"""docker-compose.yml parses and only runs commands the CLI really has; the Prometheus
config and the Grafana dashboard match the metrics the workers serve."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from prometheus_client import REGISTRY

from workers.cli import (
    JUDGE_METRICS_PORT,
    MODEL_WORKER_METRICS_PORT,
    OUTCOMES_METRICS_PORT,
    ROUTER_METRICS_PORT,
    main,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OPS = ROOT / "ops"


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


def test_workers_start_after_the_topics_and_the_schema_exist() -> None:
    """Only the set-up commands may start before the topics and the migration."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    setup = {"topics", "migrate"}
    for name, service in services.items():
        if "command" not in service or "build" not in service or name in setup:
            continue
        depends = service["depends_on"]
        for step in setup:
            assert depends[step]["condition"] == "service_completed_successfully", name


def exposed_metric_names() -> set[str]:
    """Every sample name the workers' /metrics can carry (prometheus_client adds the
    _total of counters and the _bucket/_count/_sum of histograms)."""
    import workers.stream.metrics  # noqa: F401  (registers the metrics)

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("omnirouter_")
        for suffix in suffixes[family.type]
    }


def test_the_dashboard_queries_only_metrics_the_workers_serve() -> None:
    dashboard = json.loads((OPS / "grafana" / "dashboards" / "omnirouter.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"omnirouter_[a-z_]+", expr)}
    served = exposed_metric_names()
    assert used <= served, sorted(used - served)
    # Every metric the workers serve is on the dashboard, in some form.
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in served}
    assert {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used} == families


def test_prometheus_scrapes_every_worker_on_its_metrics_port() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"prometheus", "grafana"} <= set(services)
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    scraped = {
        name: sd["port"]
        for job in config["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    expected_port = {
        "router": ROUTER_METRICS_PORT,
        "outcomes": OUTCOMES_METRICS_PORT,
        "model-worker": MODEL_WORKER_METRICS_PORT,
        "judge": JUDGE_METRICS_PORT,
    }
    workers = {name: s for name, s in services.items() if "command" in s and "build" in s}
    roles = {service["command"][0] for service in workers.values()}
    assert set(expected_port) <= roles, sorted(set(expected_port) - roles)
    for name, service in workers.items():
        role = service["command"][0]
        if role in expected_port:
            assert scraped.get(name) == expected_port[role], name


def image_environment() -> dict[str, str]:
    """What ops/Dockerfile's `ENV A=1 B=2` lines set."""
    environment: dict[str, str] = {}
    for line in (OPS / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            environment.update(word.split("=", 1) for word in shlex.split(line[4:]))
    return environment


def test_the_workers_metrics_are_reachable_from_prometheus_s_container() -> None:
    """A worker serves /metrics on loopback unless METRICS_HOST says otherwise; the
    image must, and no compose service may take it back."""
    assert image_environment()["METRICS_HOST"] == "0.0.0.0"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    workers = {name: s for name, s in services.items() if "command" in s and "build" in s}
    for name, service in workers.items():
        assert service["environment"].get("METRICS_HOST", "0.0.0.0") == "0.0.0.0", name


def with_compose_defaults(value: object) -> str:
    """A service's environment value as compose reads it when the variable is unset:
    `${NAME:-default}` becomes `default`."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_every_worker_s_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.config import Settings

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    workers = {name: s for name, s in services.items() if "command" in s and "build" in s}
    for name, service in workers.items():
        with monkeypatch.context() as environment:
            for key, value in service["environment"].items():
                environment.setenv(key, with_compose_defaults(value))
            try:
                Settings()
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise AssertionError(f"{name}: {exc}") from exc
