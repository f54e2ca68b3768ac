"""The synthetic predictor of `omnirouter bench signal` and what it measures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from workers.bench.signal import run, signal_strength, synthetic_quality
from workers.cli import main
from workers.routing.dataset import load_routerbench, shipped_sample_path


def test_no_signal_is_zero_strength_and_a_bad_auc_is_refused() -> None:
    assert signal_strength(0.5) == 0.0
    for bad in (0.4, 1.0):
        with pytest.raises(ValueError, match="AUC must be in"):
            signal_strength(bad)


@pytest.mark.parametrize("auc", [0.6, 0.75])
def test_synthetic_estimates_have_the_requested_auc_and_stay_calibrated(auc: float) -> None:
    rng = np.random.default_rng(1)
    prior = np.full((40_000, 1), 0.7)
    outcomes = (rng.random((40_000, 1)) < 0.7).astype(float)
    quality = synthetic_quality(prior, outcomes, auc, rng)
    assert roc_auc_score(outcomes[:, 0], quality[:, 0]) == pytest.approx(auc, abs=0.01)
    # Calibrated: among queries estimated near p, a share p answered well.
    for low, high in ((0.5, 0.6), (0.7, 0.8), (0.8, 0.9)):
        band = (quality[:, 0] >= low) & (quality[:, 0] < high)
        assert outcomes[band, 0].mean() == pytest.approx(quality[band, 0].mean(), abs=0.02)


def test_an_unknown_outcome_gets_its_prior() -> None:
    prior = np.array([[0.3, 0.8]])
    quality = synthetic_quality(prior, np.array([[np.nan, 1.0]]), 0.8, np.random.default_rng(0))
    assert quality[0, 0] == pytest.approx(0.3)
    assert quality[0, 1] != pytest.approx(0.8)


def test_a_stronger_predictor_routes_better_on_the_real_sample() -> None:
    table = load_routerbench(shipped_sample_path())
    weak, strong = run(table, [0.5, 0.8], window_size=60)
    assert weak.auc_measured == pytest.approx(0.5, abs=0.03)
    assert strong.auc_measured == pytest.approx(0.8, abs=0.03)
    assert strong.aiq > weak.aiq + 0.02
    assert strong.margin_at_each_model_cost[strong.best_model] is not None


def test_a_file_of_fractional_scores_is_refused() -> None:
    """The reading tells right answers from wrong ones: on fractional scores the
    estimates were neither of the AUC asked for nor calibrated, and the bench
    printed a curve for them all the same."""
    table = load_routerbench(shipped_sample_path())
    fractional = dataclasses.replace(table, scores=table.scores * 0.9)
    with pytest.raises(ValueError, match="fractional scores"):
        run(fractional, [0.7])


def test_the_command_prints_a_row_per_auc_and_refuses_a_bad_one() -> None:
    result = CliRunner().invoke(
        main, ["bench", "signal", "--auc", "0.5,0.7", "--window-size", "60"]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line[:5].strip()[:2] == "0."]
    assert [row[0] for row in rows] == ["0.50", "0.70"]
    bad = CliRunner().invoke(main, ["bench", "signal", "--auc", "0.3"])
    assert bad.exit_code != 0 and "AUC must be in [0.5, 1)" in bad.output
