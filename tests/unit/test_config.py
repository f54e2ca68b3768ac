"""Configuration: bad settings fail at start with a message that names the variable."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from workers.cli import main
from workers.config import ROUTERBENCH_MODELS, PoolPolicy, Settings, model_topic


def test_defaults_route_the_routerbench_models() -> None:
    settings = Settings()
    assert settings.router_models == list(ROUTERBENCH_MODELS)
    assert len({model_topic(m) for m in settings.router_models}) == len(ROUTERBENCH_MODELS)


def test_model_names_become_legal_topic_names() -> None:
    assert model_topic("meta/llama-2-70b-chat") == "omnirouter.route.meta-llama-2-70b-chat"
    assert model_topic("a b:c") == "omnirouter.route.a-b-c"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_MODELS", '["a", "b"]')
    monkeypatch.setenv("ROUTER_MODEL_CAPACITIES", '{"a": 5}')
    monkeypatch.setenv("ROUTER_WINDOW_SECONDS", "1.5")
    settings = Settings()
    assert settings.router_models == ["a", "b"]
    assert settings.router_model_capacities == {"a": 5}
    assert settings.router_window_seconds == 1.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"router_models": ["a", "b"], "router_model_capacities": {"c": 1}},
            "ROUTER_MODEL_CAPACITIES",
        ),
        ({"router_models": ["a/b", "a-b"]}, "clashing topic names"),
        # Kafka refuses a topic differing from another only by '.' and '_'.
        ({"router_models": ["a.b", "a_b"]}, "clashing topic names"),
        (  # a misspelt name sent our name upstream
            {"router_models": ["a", "b"], "openai_model_map": {"c": "upstream-c"}},
            r"OPENAI_MODEL_MAP names models not in ROUTER_MODELS: \['c'\]",
        ),
        ({"router_models": []}, "at least one model"),
        ({"router_window_budget_usd": -1.0}, "greater than or equal to 0"),
        # A skew of 1e11 s overflowed the bound on every query's created_at.
        ({"router_clock_skew_seconds": 1e11}, "less than or equal to 86400"),
        (
            {"router_window_seconds": 5.0, "kafka_rebalance_timeout_seconds": 3.0},
            "KAFKA_REBALANCE_TIMEOUT_SECONDS=3.0 must exceed",
        ),
        # Kafka's join request holds the timeout in 32-bit milliseconds: the
        # router failed to join its group at start.
        ({"router_window_seconds": 3e6}, "above Kafka's limit of 2147483.647 s"),
        ({"kafka_rebalance_timeout_seconds": 2.2e6}, "above Kafka's limit"),
        (  # a pool whose models cannot hold a window, though others can
            {
                "router_models": ["a", "b"],
                "router_model_capacities": {"a": 10},
                "router_pools": {
                    "small": {"mode": "budget", "window_budget_usd": 1, "models": ["a"]}
                },
            },
            "of pool 'small'",
        ),
    ],
)
def test_inconsistent_settings_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


def test_a_pool_needs_the_limit_of_its_mode() -> None:
    with pytest.raises(ValidationError, match="quality mode needs quality_target"):
        PoolPolicy(mode="quality")
    with pytest.raises(ValidationError, match="budget mode needs"):
        PoolPolicy(mode="budget")


def test_the_rebalance_timeout_outlasts_a_window_and_its_solve() -> None:
    settings = Settings(router_window_seconds=5.0, router_solver_time_limit_seconds=0.25)
    assert settings.rebalance_timeout_seconds() == pytest.approx(7.25)
    assert Settings(kafka_rebalance_timeout_seconds=30.0).rebalance_timeout_seconds() == 30.0


def cascade_pool(**fields: object) -> dict[str, object]:
    return {"c": {"mode": "budget", "budget_per_query_usd": 0.01, "cascade": True, **fields}}


PRICES = {
    m: {"input_per_mtok_usd": p, "output_per_mtok_usd": p}
    for m, p in (("a", 0.1), ("b", 0.2), ("c", 10.0))
}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_pools": cascade_pool(cascade_panel=["a", "x"])}, r"cascade_panel names models"),
        (
            {"router_pools": cascade_pool(cascade_panel=["a", "c"], models=["a", "b"])},
            "not in the pool",
        ),
        ({"router_pools": cascade_pool(cascade_panel=["a", "b", "c"])}, "none left to escalate"),
        (
            {"router_pools": cascade_pool(cascade_panel=["a", "c"]), "router_model_prices": PRICES},
            r"dearest model\(s\) \['c'\]",
        ),
        (
            {
                "router_pools": {
                    "c": {"mode": "budget", "window_budget_usd": 1, "cascade_panel": ["a"]}
                }
            },
            "cascade_panel needs cascade",
        ),
    ],
)
def test_a_cascade_pool_s_panel_is_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(router_models=["a", "b", "c"], **overrides)  # type: ignore[arg-type]


def test_a_cheap_panel_is_accepted_and_cascades_are_off_by_default() -> None:
    settings = Settings(
        router_models=["a", "b", "c"],
        router_pools=cascade_pool(cascade_panel=["a", "b"]),  # type: ignore[arg-type]
        router_model_prices=PRICES,  # type: ignore[arg-type]
    )
    assert settings.pool_policy("c").cascade_panel == ["a", "b"]
    assert not settings.pool_policy("default").cascade


def test_a_cascade_pool_may_be_in_quality_mode() -> None:
    pools = {"c": {"mode": "quality", "quality_target": 0.8, "cascade": True}}
    settings = Settings(router_models=["a", "b", "c"], router_pools=pools)  # type: ignore[arg-type]
    assert settings.pool_policy("c").cascade and settings.pool_policy("c").mode == "quality"


def test_a_cascade_pool_may_cap_its_models_panel_included() -> None:
    """Capacities bound a cascade pool's windows, probes included (before: a cap on
    any model of a cascade pool was refused at start)."""
    for capped in ({"c": 5}, {"b": 5}):
        settings = Settings(
            router_models=["a", "b", "c"],
            router_model_capacities=capped,
            router_fallback_model="a",
            router_pools=cascade_pool(cascade_panel=["a", "b"]),  # type: ignore[arg-type]
            router_model_prices=PRICES,  # type: ignore[arg-type]
        )
        assert settings.router_model_capacities == capped
    chosen = Settings(
        router_models=["a", "b", "c"],
        router_model_capacities={"b": 5},
        router_fallback_model="a",
        router_pools=cascade_pool(),  # type: ignore[arg-type]
    )
    assert chosen.pool_policy("c").cascade_panel is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (  # "model" for "models" gave the pool every model
            {"router_pools": {"p": {"mode": "quality", "quality_target": 0.8, "model": ["a"]}}},
            "router_pools.p.model\n  Extra inputs are not permitted",
        ),
        (
            {"router_model_prices": {"a": {"input_per_mtok_usd": 1, "output_per_mtok": 2}}},
            "router_model_prices.a.output_per_mtok\n  Extra inputs",
        ),
        ({"judge_price": {"input_usd": 1}}, "judge_price.input_usd\n  Extra inputs"),
        (
            {"router_pools": {"p": {"mode": "quality", "quality_target": 0.8, "models": []}}},
            "at least 1 item",
        ),
        ({"router_prior_strength": float("inf")}, "finite number"),
        ({"router_window_seconds": float("nan")}, "finite number"),
        (
            {"router_model_prices": {"a": {"input_per_mtok_usd": "inf", "output_per_mtok_usd": 1}}},
            "finite number",
        ),
        (
            {"router_pools": {"p": {"mode": "budget", "window_budget_usd": "nan"}}},
            "finite number",
        ),
        (  # a cascade pool of one model could never be fitted
            {
                "router_pools": {
                    "c": {
                        "mode": "budget",
                        "window_budget_usd": 1,
                        "models": ["a"],
                        "cascade": True,
                    }
                }
            },
            r"ROUTER_POOLS\[c\] is a cascade pool of 1 model",
        ),
        (
            {
                "router_models": ["a"],
                "router_pools": {"c": {"mode": "budget", "window_budget_usd": 1, "cascade": True}},
            },
            r"ROUTER_POOLS\[c\] is a cascade pool of 1 model",
        ),
        ({"database_url": "localhost:5432/omnirouter"}, "DATABASE_URL is not a database URL"),
    ],
)
def test_misspelt_infinite_empty_and_unusable_values_are_rejected(
    overrides: dict[str, object], message: str
) -> None:
    overrides = {"router_models": ["a", "b"], **overrides}
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ROUTER_POOLS", '{"p":', "ROUTER_POOLS is not valid JSON: Expecting value"),
        ("ROUTER_MODELS", "claude-v1", "ROUTER_MODELS is not valid JSON"),
        ("ROUTER_PRIOR_STRENGTH", "inf", "ROUTER_PRIOR_STRENGTH: Input should be a finite number"),
        (
            "ROUTER_POOLS",
            '{"p": {"mode": "budget", "window_budget_usd": 1, "model": ["claude-v1"]}}',
            r"ROUTER_POOLS\[p\].model: Extra inputs are not permitted",
        ),
        ("DATABASE_URL", "db-pass-456@localhost", "DATABASE_URL is not a database URL"),
    ],
)
def test_the_config_command_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    """Malformed JSON printed a 56-line traceback, and field errors named pydantic's
    fields (router_pools.p.model), not the variable the user sets."""
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 3
    assert re.search(message, result.output), result.output
    assert "db-pass-456" not in result.output  # a URL's password is never repeated


def test_the_benchmarks_load_settings_as_the_commands_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTER_MODELS", "claude-v1")
    result = CliRunner().invoke(main, ["bench", "cascade", "--queries", "1"])
    assert result.exit_code == 1 and "ROUTER_MODELS is not valid JSON" in result.output


def test_a_policy_takes_one_limit_of_its_mode() -> None:
    """Two budgets were silently resolved (window_budget_usd beat budget_per_hour_usd),
    a quality pool's budget silently ignored."""
    with pytest.raises(ValidationError, match="budget mode takes one budget limit"):
        PoolPolicy(mode="budget", window_budget_usd=1.0, budget_per_hour_usd=5.0)
    with pytest.raises(ValidationError, match="quality mode takes no budget limit"):
        PoolPolicy(mode="quality", quality_target=0.8, budget_per_query_usd=0.01)
    with pytest.raises(ValidationError, match="ROUTER_MODE=budget needs its limit, one only"):
        Settings(
            router_mode="budget", router_window_budget_usd=1.0, router_budget_per_query_usd=0.1
        )
    with pytest.raises(ValidationError, match="ROUTER_MODE=quality needs its limit, one only"):
        Settings(router_budget_per_hour_usd=5.0)


def test_a_session_timeout_faust_would_refuse_is_refused_at_start() -> None:
    """Faust refuses a session timeout above its request timeout (90 s) when a worker's
    consumer starts: KAFKA_SESSION_TIMEOUT_SECONDS=120 passed here, and every worker
    then stopped with Faust's ImproperlyConfigured traceback."""
    from faust.types.settings import Settings as FaustSettings

    from workers.config import MAX_SESSION_TIMEOUT_SECONDS

    assert FaustSettings("x").broker_request_timeout == MAX_SESSION_TIMEOUT_SECONDS == 90.0
    assert Settings(kafka_session_timeout_seconds=90.0).kafka_session_timeout_seconds == 90.0
    with pytest.raises(ValidationError, match="less than or equal to 90"):
        Settings(kafka_session_timeout_seconds=120.0)


@pytest.mark.parametrize(
    ("pool", "field"),
    [
        ({"mode": "quality", "quality_target": 0.8, "models": ["a", "b", "a"]}, "models"),
        (
            {
                "mode": "quality",
                "quality_target": 0.8,
                "cascade": True,
                "cascade_panel": ["a", "a"],
            },
            "cascade_panel",
        ),
    ],
)
def test_a_pool_names_each_model_once(pool: dict[str, object], field: str) -> None:
    """A model listed twice was two columns of the window: twice its capacity (with
    ROUTER_MODEL_CAPACITIES {"a": 4}, 8 queries on it) while its report counted 4;
    twice in a panel, its probe was paid for twice in the cascade's predicted cost."""
    with pytest.raises(ValidationError, match=rf"{field} names 'a' more than once"):
        Settings(router_models=["a", "b", "c"], router_pools={"p": pool})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "m" * 201])
def test_a_model_name_fits_the_events(name: str) -> None:
    """Outcomes take a model name of 1 to 200 characters: a model named "" (or a longer
    name) was routed to, and its model worker failed validating every answer's Outcome."""
    with pytest.raises(ValidationError, match=r"router_models\.1"):
        Settings(router_models=["a", name])
