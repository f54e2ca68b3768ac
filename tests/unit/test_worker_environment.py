"""The workers a command starts under a routing policy of its own (the demo, the
benchmarks) inherit the user's environment but not the user's routing policy."""

from __future__ import annotations

import os

import pytest

from workers.config import Settings, environment_for_workers
from workers.demo import demo_budget_per_hour, demo_environment
from workers.routing.dataset import OutcomeTable, load_routerbench, shipped_sample_path


def settings_under(environment: dict[str, str]) -> Settings:
    """Settings as a worker started with exactly `environment` reads them."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            patch.delenv(name)
        for name, value in environment.items():
            patch.setenv(name, value)
        return Settings()


def test_the_policy_is_the_command_s_and_the_rest_is_inherited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exported = {
        "ROUTER_MODE": "quality",
        "ROUTER_QUALITY_TARGET": "0.9",
        "ROUTER_BUDGET_PER_HOUR_USD": "5",
        "router_pools": '{"default": {"mode": "quality", "quality_target": 0.7}}',  # any case
        "ROUTER_MODEL_CAPACITIES": '{"mistralai/mistral-7b-chat": 1}',
        "ROUTER_FALLBACK_MODEL": "mistralai/mistral-7b-chat",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "EMBEDDER_CACHE_DIR": "/var/cache/embedders",
        "ROUTER_SOLVER": "exact",
    }
    for name, value in exported.items():
        monkeypatch.setenv(name, value)

    env = environment_for_workers({"ROUTER_MODE": "budget", "ROUTER_WINDOW_BUDGET_USD": "1"})

    policy = {name: value for name, value in env.items() if name.upper().startswith("ROUTER_")}
    assert policy == {
        "ROUTER_MODE": "budget",
        "ROUTER_WINDOW_BUDGET_USD": "1",
        "ROUTER_SOLVER": "exact",
    }
    assert env["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["EMBEDDER_CACHE_DIR"] == "/var/cache/embedders"
    assert env["PATH"] == os.environ["PATH"]


@pytest.fixture(scope="module")
def sample() -> OutcomeTable:
    return load_routerbench(shipped_sample_path())


@pytest.mark.parametrize(
    "exported",
    [
        # A budget of the user's beside the demo's: two budget limits, refused at start.
        {"ROUTER_MODE": "budget", "ROUTER_BUDGET_PER_QUERY_USD": "0.01"},
        # A default pool of the user's: the demo silently routed under it.
        {"ROUTER_POOLS": '{"default": {"mode": "quality", "quality_target": 0.9}}'},
    ],
)
def test_the_demo_s_workers_route_under_the_demo_s_budget_whatever_is_exported(
    monkeypatch: pytest.MonkeyPatch, sample: OutcomeTable, exported: dict[str, str]
) -> None:
    for name, value in exported.items():
        monkeypatch.setenv(name, value)

    settings = settings_under(demo_environment("127.0.0.1:9092", "sqlite://", sample))

    policy = settings.pool_policy("default")
    assert policy.mode == "budget"
    assert policy.budget_per_hour_usd == pytest.approx(demo_budget_per_hour(sample), rel=1e-6)
    assert policy.window_budget_usd is None and policy.budget_per_query_usd is None
    assert settings.router_pools == {}
