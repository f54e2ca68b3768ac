"""The offline replay of the cold-start loop (`omnirouter bench cold-start-replay`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from workers.bench.cold_start_replay import (
    PairedDifference,
    ReplayBlock,
    ReplayRun,
    ReplaySummary,
    read_runs,
    replay,
)
from workers.cli import main
from workers.config import Settings
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import Embedder

# No exploration and no shadow answers: only the judge's sample teaches the router.
NO_LEARNING_SPEND = Settings(router_exploration_share=0.0, router_shadow_share=0.0)


def test_the_store_learns_only_what_the_judge_scores(router_embedder: Embedder) -> None:
    table = load_routerbench(shipped_sample_path())

    def run(judge_share: float) -> ReplayRun:
        return replay(
            table, router_embedder, NO_LEARNING_SPEND, seed=0, queries=100,
            judge_share=judge_share, judge_flip=0.0, block_size=50,
        )  # fmt: skip

    unjudged, judged = run(0.0), run(1.0)

    assert [b.scored_so_far for b in unjudged.blocks] == [0, 0]
    # Every answer judged, by the end of the window holding each block's last query
    # (windows of 20: queries 40-59 and 80-99).
    assert [b.scored_so_far for b in judged.blocks] == [60, 100]
    for block in (*unjudged.blocks, *judged.blocks):
        assert 0.0 <= block.accuracy <= 1.0 and block.cost_usd > 0.0


def run(seed: int, last_accuracy: float, last_cost: float = 0.9) -> ReplayRun:
    early = ReplayBlock(0.5, 1.0, 0, warm_accuracy=0.8, warm_cost_usd=1.0)
    last = ReplayBlock(last_accuracy, last_cost, 10, warm_accuracy=0.8, warm_cost_usd=1.0)
    return ReplayRun(seed, 1.0, [early, early, early, last])


def test_the_summary_reads_the_last_block_against_the_warm_router() -> None:
    summary = ReplaySummary.of([run(0, 0.79), run(1, 0.75)])

    assert summary.mean_gap_points == pytest.approx(-3.0)
    assert summary.standard_error_points == pytest.approx(2.0)
    assert summary.within_two_points == 1
    assert summary.last_blocks_gap_points == pytest.approx((-30 * 3 - 3) / 4)
    assert summary.spend_of_warm == pytest.approx(0.9)


def test_two_versions_are_compared_seed_by_seed_over_the_seeds_both_ran() -> None:
    before = [run(0, 0.70), run(1, 0.80), run(2, 0.60)]
    after = [run(1, 0.83, last_cost=1.8), run(0, 0.71, last_cost=0.9)]  # seed 2 not run

    paired = PairedDifference.of(after, before)

    assert paired.seeds == 2
    assert paired.last_block_points == pytest.approx((1.0 + 3.0) / 2)
    assert paired.last_block_error == pytest.approx(1.0)
    assert paired.later_blocks_points == pytest.approx(paired.last_block_points / 4)
    assert paired.per_block_points == pytest.approx([0.0, 0.0, 0.0, 2.0])
    assert paired.spend_ratio == pytest.approx((2.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="no seed in common"):
        PairedDifference.of([run(5, 0.7)], before)


def test_a_written_run_reads_back_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    runs = [run(0, 0.70), run(3, 0.85)]
    path.write_text("".join(r.to_json() + "\n" for r in runs))

    assert read_runs(path) == runs


def test_the_command_prints_each_seed_and_writes_its_blocks(tmp_path: Path) -> None:
    out = tmp_path / "replay.jsonl"
    result = CliRunner().invoke(
        main,
        ["bench", "cold-start-replay", "--queries", "60", "--seeds", "2", "--out", str(out)],
    )

    assert result.exit_code == 0, result.output
    assert "seed   1:" in result.output and "within 2 points in" in result.output
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(len(r["blocks"]) == 1 for r in runs)  # 60 queries: one block of 250

    # The same code against its own output: nothing differs, seed by seed.
    again = CliRunner().invoke(
        main,
        [
            "bench", "cold-start-replay", "--queries", "60", "--seeds", "2",
            "--out", str(out), "--against", str(out),
        ],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "paired over 2 seeds: last block +0.00 points" in again.output


def test_the_command_refuses_a_file_that_is_not_a_replay_output(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text('{"seed": 0}\n')
    result = CliRunner().invoke(
        main, ["bench", "cold-start-replay", "--seeds", "1", "--against", str(other)]
    )

    assert result.exit_code != 0
    assert "not a cold-start-replay output" in result.output


def test_the_command_refuses_a_file_of_other_seeds_before_replaying(tmp_path: Path) -> None:
    other = tmp_path / "seed3.jsonl"
    other.write_text(run(3, 0.85).to_json() + "\n")
    result = CliRunner().invoke(
        main,
        ["bench", "cold-start-replay", "--queries", "60", "--seeds", "2", "--against", str(other)],
    )

    assert result.exit_code != 0
    assert "holds none of seeds 0 to 1" in result.output
    assert "seed   0:" not in result.output  # refused before the first order ran
