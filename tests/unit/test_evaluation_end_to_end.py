"""`omnirouter evaluate` end to end on a slice of the real RouterBench sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from workers.cli import main
from workers.routing.dataset import load_routerbench, shipped_sample_path


def test_evaluate_cross_validates_a_real_slice(tmp_path: Path) -> None:
    sample = shipped_sample_path().read_text().splitlines()[:150]
    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join(sample) + "\n")
    out = tmp_path / "out"

    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--train",
            str(data),
            "--window-size",
            "30",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-cascade",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "at the cost of model" in result.output
    assert "cascade_budget" not in json.loads((out / "report.json").read_text())["routers"]
    report = json.loads((out / "report.json").read_text())
    assert (out / "cost_quality.png").stat().st_size > 10_000

    table = load_routerbench(data)
    scored = ~np.isnan(table.scores).any(axis=1)
    for j, model in enumerate(table.models):
        (point,) = report["routers"][f"model:{model}"]
        assert point["accuracy"] == pytest.approx(np.mean(table.scores[scored, j]))
        assert point["cost_usd"] == pytest.approx(np.sum(table.costs[scored, j]))
    oracle = report["routers"]["oracle"][0]["accuracy"]
    assert all(oracle >= s["accuracy"] for s in report["single_models"].values())
    for router in (
        "omnirouter_budget",
        "omnirouter_quality",
        "greedy_threshold",
        "random",
        "cheapest",
    ):
        assert report["routers"][router], router
        assert 0 <= report["aiq"][router] <= oracle
    # Budget mode keeps every window within budget on predicted cost, so a larger
    # budget never buys lower predicted quality; realised accuracy at the top
    # budget must beat the cheapest-model plan.
    budget_points = sorted(
        report["routers"]["omnirouter_budget"], key=lambda p: p["budget_per_query_usd"]
    )
    assert budget_points[-1]["accuracy"] > report["routers"]["cheapest"][0]["accuracy"]
    assert set(report["targets"]) >= {"beats_every_model_by_1_point", "aiq_beats_greedy"}
    # The headroom: the same windows and budgets solved knowing every outcome.
    assert report["aiq"]["oracle_budget"] > report["aiq"]["omnirouter_budget"]
    assert report["aiq"]["oracle_budget"] <= oracle + 1e-9
    auc = report["predictor_within_task_auc"]
    assert set(auc) == {*table.eval_names, "all"}
    assert all(0.0 <= value <= 1.0 for value in auc.values())
    assert "predictor within-task AUC" in result.output


def evaluate_slice(tmp_path: Path, mode: str) -> tuple[Path, str, dict[str, Any]]:
    """`omnirouter evaluate` in one `--mode` (fast solver, windows of 30) on the first
    150 rows of the shipped sample: the slice's path, the output and report.json."""
    sample = shipped_sample_path().read_text().splitlines()[:150]
    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join(sample) + "\n")
    out = tmp_path / "out"
    arguments = ["evaluate", "--train", str(data), "--window-size", "30", "--mode", mode]
    arguments += ["--solver", "fast", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    return data, result.output, json.loads((out / "report.json").read_text())


def test_evaluate_routes_the_cascade_from_the_recorded_responses(tmp_path: Path) -> None:
    data, output, report = evaluate_slice(tmp_path, "budget")
    table = load_routerbench(data)
    scored = ~np.isnan(table.scores).any(axis=1)
    cascade = report["routers"]["cascade_budget"]
    assert len(cascade) == len(report["routers"]["omnirouter_budget"])
    for point in cascade:
        # Every probe and escalation is paid for, and a point never costs more than
        # answering every query with the panel and then the dearest model.
        assert 0 <= point["probe_usd"] + point["escalation_usd"] <= point["cost_usd"] + 1e-12
    assert max(p["probe_usd"] for p in cascade) > 0
    assert 0 <= report["aiq"]["cascade_budget"] <= report["routers"]["oracle"][0]["accuracy"]
    (rule,) = report["routers"]["agreement_rule"]
    panels = report["settings"]["cascade_panel_per_split"]
    assert len(panels) == 5 and all(len(p) == 2 for p in panels)
    # The rule pays both probes on every scored query, each at least the cheapest model.
    assert rule["probe_usd"] >= 2 * table.costs[scored].min(axis=1).sum() - 1e-12
    assert rule["cost_usd"] >= rule["probe_usd"]
    targets = report["cascade_targets"]
    assert {"accuracy_at_35pct_of_best_model_cost", "least_margin_over_one_shot"} <= set(targets)
    auc = report["scorer_within_task_auc"]
    assert set(auc) == {"scorer", "predictor"}
    assert all(0.0 <= v <= 1.0 for v in auc["scorer"].values())
    assert "scorer within-task AUC" in output


def test_a_malformed_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(main, ["evaluate", "--train", str(bad)])
    assert result.exit_code != 0
    assert "bad.jsonl:1: not a RouterBench row" in result.output


def test_evaluate_routes_the_cascade_in_quality_mode_at_the_one_shot_targets(
    tmp_path: Path,
) -> None:
    """`--mode quality` routes the cascade too (before: budget mode only), one point
    per target of the one-shot quality router, every probe and escalation paid."""
    _, _, report = evaluate_slice(tmp_path, "quality")
    routers = report["routers"]
    assert "cascade_budget" not in routers
    cascade = routers["cascade_quality"]
    targets = sorted(p["target"] for p in cascade)
    assert targets == sorted(p["target"] for p in routers["omnirouter_quality"])
    for point in cascade:
        assert 0 <= point["probe_usd"] + point["escalation_usd"] <= point["cost_usd"] + 1e-12
    assert max(p["probe_usd"] for p in cascade) > 0
