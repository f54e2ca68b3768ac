"""The offline replay of the cold-start loop (`omnirouter bench cold-start-replay`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from workers.bench.cold_start_replay import ReplayBlock, ReplayRun, ReplaySummary, replay
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


def test_the_summary_reads_the_last_block_against_the_warm_router() -> None:
    def run(seed: int, last_accuracy: float) -> ReplayRun:
        early = ReplayBlock(0.5, 1.0, 0, warm_accuracy=0.8, warm_cost_usd=1.0)
        last = ReplayBlock(last_accuracy, 0.9, 10, warm_accuracy=0.8, warm_cost_usd=1.0)
        return ReplayRun(seed, 1.0, [early, early, early, last])

    summary = ReplaySummary.of([run(0, 0.79), run(1, 0.75)])

    assert summary.mean_gap_points == pytest.approx(-3.0)
    assert summary.standard_error_points == pytest.approx(2.0)
    assert summary.within_two_points == 1
    assert summary.last_blocks_gap_points == pytest.approx((-30 * 3 - 3) / 4)
    assert summary.spend_of_warm == pytest.approx(0.9)


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
