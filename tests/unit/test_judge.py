"""The judge's pure parts: reading a score from a reply, the deterministic sample,
the replay judge's flips, the rubric, and what a verdict publishes."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from aiokafka.errors import KafkaTimeoutError
from click.testing import CliRunner
from prometheus_client import REGISTRY

from schemas import DeadLetter, ModelResponse, Outcome
from workers.cli import main
from workers.config import Settings
from workers.routing.dataset import OutcomeTable, load_routerbench, shipped_sample_path
from workers.stream.app import Topics
from workers.stream.judge import (
    Verdict,
    checked,
    events_per_batch,
    hashed_share,
    is_sampled,
    judge_events,
    select,
    verdict_outcome,
)
from workers.stream.judge_openai import (
    BUILT_IN_RUBRIC,
    ChatJudge,
    fill,
    parse_score,
    rubric_in_force,
)
from workers.stream.judge_replay import ReplayJudge


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("The answer is right.\nScore: 8", 0.8),
        ("Score: 0", 0.0),
        ("Score: 10", 1.0),
        ("Score: 7/10", 0.7),
        ("Score: 7 / 10", 0.7),
        ("Score: 7 out of 10", 0.7),
        ("Score: 8.5", 0.85),
        ("Score: 6.5/10.", 0.65),
        ("**Score:** 9", 0.9),
        ("score = 4", 0.4),
        ("The final score is 6", 0.6),
        ("Score (0-10): 3", 0.3),
        ("Score: 3\nOn reflection it is better.\nScore: 8", 0.8),  # the last one counts
        ("Rating: 4/10", 0.4),
        ("I would give it a rating of 2.", 0.2),
        ("Correct. 9/10", 0.9),
        ("It gets 2/3 of the steps right; overall 7/10", 0.7),  # only /10 is the scale
        ("Score: 9 (the answer has 2 small errors)", 0.9),
        ("8", 0.8),
        ("  7.5  ", 0.75),
        ("9/10", 0.9),
        ("### Final Score: 7", 0.7),
        # The Score line counts; a prose mention after it does not.
        ("Score: 6\n\n(A score of 10 would require the units.)", 0.6),
        ("Score: 7\nNote: a perfect score is 10.", 0.7),
        ("Score: 4\nThe scale is one where a score of 0 means wrong.", 0.4),
        ("A score of 10 needs the units; these lack them.\nScore: 5", 0.5),
        ("The final score is 6, I think; its score is 6.", 0.6),  # prose that agrees
        # The rubric's scale named beside the score, or numbers that name no scale.
        ("Score (1-10): 7", 0.7),
        ("Score: 8 out of 10 (missing 2 steps)", 0.8),
        ("Score: 7 (0 = wrong, 10 = right)", 0.7),
        ("Rating (0-10): 4", 0.4),
        ("Score: 9\nNo other issue; my final score: 9 stands.", 0.9),  # a revision agrees
        # Numbers beside the score that name no scale.
        ("Score: 8 (GPT-4 level answer)", 0.8),
        ("Score: 7 (3 of 4 steps correct)", 0.7),
        ("Score: 9 - cites the 2019-2020 figures", 0.9),
        ("Score: 6/10, loses points on 1 to 2 unit errors", 0.6),
        ("It earns a rating of 8; it meets 2 of 3 criteria.", 0.8),
        ("Score: 8\nRubric reminder: a perfect score: 10 needs units.", 0.8),
        ("Score: 9 (final score: 9)", 0.9),  # a revision on the same line that agrees
        # A heading over a numbered list: the list's "1." is no score.
        ("### Rating\n\n1. Accuracy: wrong.\n2. Completeness: poor.\n\nOverall 2/10", 0.2),
        ("Score: 7 on a 1-10 scale", 0.7),
        ("Score: 8\n**Revised score: 6/10**", 0.6),  # a revision on a line of its own
        ("Score: 8\nUpdated score: 5", 0.5),
    ],
)
def test_readable_replies_give_their_score(reply: str, score: float) -> None:
    assert parse_score(reply) == pytest.approx(score)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "   \n ",
        "I cannot tell; the weather is nice today.",
        "Score: N",  # the template, echoed
        "Score: NaN",
        "Score: nan\n7/10",  # a "Score:" line without a number: the judge did not say
        "Score: infinity",
        "Score: 42",  # off the scale
        "Score: -3",
        "Score: 11/10",
        "Score: 4/5",  # another scale than the one asked for: no guess
        "Score: 80%",
        "Score: 1e3",
        "Score: 8,5",
        "8/10 or maybe 6/10",  # two candidates, no label
        "I'd say 8, maybe 6",
        "The answer mentions 1945 correctly.",
        "It has 3 errors.",
        "Score: 1" + "0" * 400,
        "Score: 7-8",  # a range: no single score, no guess
        "Score: 7 - 8/10",
        "Score: 7 to 8",
        "Score: 7 or 8",
        "Score: 8\nScore: N",  # the last Score line has no number
        "The score is 7-8.",
        "The score is 6, though a score of 10 is arguable.",  # prose that disagrees
        # Another scale named beside the score: these were read out of 10.
        "Score (out of 5): 4",
        "Score: 4 (out of 5)",
        "Score: 4 of 5",
        "Score: 10 (out of 100)",
        "Score: 3 on a scale of 1 to 5",
        "Rating (1-5): 4",
        "I'd give it a score of 4 out of 5 points.",
        # A revision after the last Score line, mid-line: it was read as the first 9.
        "Score: 9\nOn reflection the units are wrong, so my final score: 3",
        # ... and on the Score line itself: it was read as the 9.
        "Score: 9; on reflection the units are wrong, final score: 2",
        "score: 0.9 ... final score: 0.2",
        "Score: 8; on reflection my revised score: 6",
        # A label over a numbered list: its "1." was read as a score of 0.1.
        "Rating:\n1. Accuracy: the answer is wrong.",
        "Grade:\n1. Wrong units.",
        "Score\n1. The answer is correct.",
        # Another scale in other words: these were read out of 10.
        "Score: 7 on a 1-5 scale",
        "rating: 7 (on a 1-5 scale)",
        "Score: 3 points out of 5",
        "Score: 4 stars out of 5",
    ],
)
def test_unreadable_replies_give_no_score(reply: str | None) -> None:
    assert parse_score(reply) is None


def test_parsing_a_pathological_reply_is_quick() -> None:
    import time

    started = time.perf_counter()
    # The last: each mention's scale was looked for to the end of its line (240k
    # characters: 178 s).
    for reply in (
        "score" + " " * 50_000 + "x",
        "Score: " + "*" * 50_000,
        "7/" * 30_000,
        "rating of 5 " * 4_000 + "rating of 6",
    ):
        assert parse_score(reply) is None
    assert time.perf_counter() - started < 2.0


def responses(count: int, model: str = "m") -> list[ModelResponse]:
    return [
        ModelResponse(query_id=f"q{i}", model=model, pool="default", response="a", text="t")
        for i in range(count)
    ]


def test_an_accepted_probe_answer_published_again_is_not_judged_twice() -> None:
    """The router publishes an accepted probe answer again as the query's final
    answer (same query, model and text): the probe response was the one sampled."""
    probe, answer = (
        ModelResponse(query_id="q", model="m", pool="p", response="a", role=role, final=final)
        for role, final in (("probe", False), ("answer", True))
    )
    republished = probe.model_copy(update={"final": True})
    assert select([probe, republished, answer], share=1.0) == [probe, answer]


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_the_sample_is_near_the_share_and_the_same_every_time(share: float) -> None:
    keys = responses(10_000)
    first = [is_sampled(r, share) for r in keys]
    second = [is_sampled(r, share) for r in responses(10_000)]
    assert first == second
    # Binomial: within 4 standard deviations of the share.
    tolerance = 4 * math.sqrt(share * (1 - share) / len(keys))
    assert abs(sum(first) / len(keys) - share) < tolerance
    # The model is part of the key: another model's sample is a different one.
    other = [is_sampled(r, share) for r in responses(10_000, model="other")]
    assert other != first


def test_share_zero_and_one_take_nothing_and_everything() -> None:
    keys = responses(2_000)
    assert not any(is_sampled(r, 0.0) for r in keys)
    assert all(is_sampled(r, 1.0) for r in keys)


def test_every_exploratory_answer_is_judged() -> None:
    explored = [r.model_copy(update={"exploration": True}) for r in responses(500)]
    assert all(is_sampled(r, 0.0) for r in explored)
    assert all(is_sampled(r, 0.2) for r in explored)


def test_every_shadow_answer_is_judged() -> None:
    """A shadow answer is asked only to be judged: a share of them would waste the rest."""
    shadows = [r.model_copy(update={"role": "shadow", "final": False}) for r in responses(500)]
    assert all(is_sampled(r, 0.0) for r in shadows)
    probes = [r.model_copy(update={"role": "probe", "final": False}) for r in responses(500)]
    assert not any(is_sampled(r, 0.0) for r in probes)


def test_the_sample_does_not_depend_on_the_process() -> None:
    """hashlib, not hash(): another interpreter with another hash seed agrees."""
    code = (
        "from workers.stream.judge import hashed_share;"
        "print([hashed_share(f'q{i}', 'm', 'sample') for i in range(20)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str([hashed_share(f"q{i}", "m", "sample") for i in range(20)])


def test_a_batch_takes_about_concurrency_sampled_answers() -> None:
    assert events_per_batch(8, 0.2) == 40
    assert events_per_batch(8, 1.0) == 8
    assert events_per_batch(8, 0.0) == 1000
    assert events_per_batch(8, 0.001) == 1000


def replay_responses(table: OutcomeTable) -> list[ModelResponse]:
    return [
        ModelResponse(
            query_id=f"r{row}", model=model, pool="default", response="x", text=table.prompts[row]
        )
        for row in range(len(table))
        for model in table.models
    ]


async def test_the_replay_judge_flips_the_share_asked_for_and_always_the_same() -> None:
    table = load_routerbench(shipped_sample_path())
    answers = replay_responses(table)
    truth = await ReplayJudge(table, flip_share=0.0).score(answers)
    flipped = await ReplayJudge(table, flip_share=0.3).score(answers)
    again = await ReplayJudge(table, flip_share=0.3).score(answers)
    assert flipped == again
    judged = [
        (answer, t.score, f.score)
        for answer, t, f in zip(answers, truth, flipped, strict=True)
        if t.score is not None
    ]
    assert len(judged) > 5_000
    assert all(f == pytest.approx(1 - t) or f == t for _, t, f in judged)
    share = sum(1 for _, t, f in judged if f != t) / len(judged)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(judged))
    # Which answers are flipped does not follow which are sampled (salts differ).
    sampled = [(t, f) for answer, t, f in judged if is_sampled(answer, 0.2)]
    sampled_share = sum(1 for t, f in sampled if f != t) / len(sampled)
    assert abs(sampled_share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(sampled))
    assert {v.cost_usd for v in flipped if v.score is not None} == {0.0}


async def test_the_replay_judge_finds_prompts_by_text_or_sample_id_and_knows_no_other() -> None:
    table = OutcomeTable(
        sample_ids=["s0", "s1"],
        eval_names=["e", "e"],
        prompts=["what is two and two?", "name a colour"],
        models=["a", "b"],
        scores=np.array([[1.0, 0.0], [float("nan"), 1.0]]),
        costs=np.zeros((2, 2)),
        responses=[{}, {}],
    )
    judge = ReplayJudge(table)

    def response(text: str | None, model: str, **metadata: str) -> ModelResponse:
        return ModelResponse(
            query_id="q", model=model, pool="p", response="x", text=text, metadata=metadata
        )

    verdicts = await judge.score(
        [
            response("what is two and two?", "a"),
            response("what is two and two?", "b"),
            response(None, "b", sample_id="s1"),
            response("never recorded", "a"),
            response("name a colour", "a"),  # NaN: not recorded
            response("name a colour", "z"),
        ]
    )
    assert [v.score for v in verdicts] == [1.0, 0.0, 1.0, None, None, None]
    assert all(v.error for v in verdicts[3:])


def test_the_rubric_needs_both_placeholders() -> None:
    assert rubric_in_force("") == BUILT_IN_RUBRIC
    assert rubric_in_force("Q: {question} A: {answer}") == "Q: {question} A: {answer}"
    with pytest.raises(ValueError, match=r"JUDGE_RUBRIC must contain .*missing: \{answer\}"):
        rubric_in_force("Grade this: {question}")
    with pytest.raises(ValueError, match="JUDGE_RUBRIC"):
        ChatJudge(Settings(judge_rubric="no placeholders at all"))


def test_a_bad_rubric_stops_the_command_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("JUDGE_RUBRIC", "Grade: {answer}")
    result = CliRunner().invoke(main, ["judge", "openai"])
    assert result.exit_code != 0
    assert "JUDGE_RUBRIC must contain" in result.output and "{question}" in result.output


def test_filling_the_rubric_leaves_the_texts_as_they_are() -> None:
    rubric = 'Q: {question}\nA: {answer}\nReply as {"score": N}'
    filled = fill(rubric, "what is {answer}?", "it is {question}")
    assert filled == 'Q: what is {answer}?\nA: it is {question}\nReply as {"score": N}'
    assert "{question}" in BUILT_IN_RUBRIC and "{answer}" in BUILT_IN_RUBRIC
    assert "Score: N" in BUILT_IN_RUBRIC


def test_what_a_verdict_publishes() -> None:
    (response,) = responses(1)
    scored = verdict_outcome(response, Verdict(score=0.7, cost_usd=0.002))
    assert scored is not None
    assert (scored.quality_score, scored.source, scored.judge_cost_usd) == (0.7, "judge", 0.002)
    assert scored.score_source == "judge" and scored.text is None
    spent = verdict_outcome(response, Verdict(cost_usd=0.002, error="no score"))
    assert spent is not None and spent.quality_score is None and spent.judge_cost_usd == 0.002
    assert verdict_outcome(response, Verdict(cost_usd=0.0, error="no score")) is None
    assert verdict_outcome(response, Verdict(error="timed out")) is None


def test_a_judge_s_out_of_range_score_is_no_score() -> None:
    assert checked(Verdict(score=1.5, cost_usd=0.1)).score is None
    assert checked(Verdict(score=float("nan"))).score is None
    assert checked(Verdict(score=0.5, cost_usd=-1.0)) == Verdict(score=0.5, cost_usd=None)
    assert checked(Verdict(score=1.0, cost_usd=0.0)) == Verdict(score=1.0, cost_usd=0.0)


class FakeTopic:
    """Records what is sent; a send's future is already done, as the broker's ack."""

    app = SimpleNamespace(conf=SimpleNamespace(producer_max_request_size=1_000_000))

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def send(self, key: bytes | None = None, value: bytes = b"") -> asyncio.Future[None]:
        self.sent.append((key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def fake_topics() -> tuple[Topics, FakeTopic, FakeTopic]:
    outcomes, deadletter = FakeTopic(), FakeTopic()
    topics = Topics(
        queries=cast(Any, None), predicted=cast(Any, None), windows=cast(Any, None),
        outcomes=cast(Any, outcomes), responses=cast(Any, None),
        deadletter=cast(Any, deadletter), routes={},
    )  # fmt: skip
    return topics, outcomes, deadletter


def event(value: bytes, offset: int) -> Any:
    message = SimpleNamespace(
        value=value, key=b"k", topic="omnirouter.responses", partition=0, offset=offset
    )
    return SimpleNamespace(message=message)


class FixedJudge:
    def __init__(self, verdict: Verdict | Exception) -> None:
        self.verdict = verdict
        self.seen: list[str] = []

    async def score(self, responses: Sequence[ModelResponse]) -> list[Verdict]:
        self.seen.extend(r.query_id for r in responses)
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return [self.verdict for _ in responses]

    async def close(self) -> None:
        return None


def batch() -> list[Any]:
    answered = responses(3)
    failed = ModelResponse(query_id="e", model="m", pool="p", response=None, error="HTTP 500")
    raws = [r.model_dump_json().encode() for r in [*answered, failed]] + [b"{not json"]
    return [event(raw, offset) for offset, raw in enumerate(raws)]


async def test_a_batch_s_sample_is_judged_and_published_and_bad_bytes_are_dead_letters() -> None:
    topics, outcomes, deadletter = fake_topics()
    judge = FixedJudge(Verdict(score=0.6, cost_usd=0.01))
    await judge_events(batch(), judge, 1.0, topics)
    assert judge.seen == ["q0", "q1", "q2"]  # not the failed answer
    published = [Outcome.model_validate_json(value) for _, value in outcomes.sent]
    assert [(o.query_id, o.quality_score, o.source) for o in published] == [
        ("q0", 0.6, "judge"), ("q1", 0.6, "judge"), ("q2", 0.6, "judge"),
    ]  # fmt: skip
    assert [key for key, _ in outcomes.sent] == [b"q0", b"q1", b"q2"]
    (letter,) = [DeadLetter.model_validate_json(value) for _, value in deadletter.sent]
    assert letter.source_offset == 4 and letter.reason.startswith("not JSON")


async def test_a_failing_judge_costs_its_batch_not_the_worker() -> None:
    topics, outcomes, _ = fake_topics()
    before = REGISTRY.get_sample_value("omnirouter_judge_failed_batches_total") or 0.0
    await judge_events(batch(), FixedJudge(RuntimeError("bug")), 1.0, topics)  # does not raise
    assert outcomes.sent == []
    assert REGISTRY.get_sample_value("omnirouter_judge_failed_batches_total") == before + 1


class UnreachableTopic(FakeTopic):
    """A broker that is away: every send fails, as an unacknowledged produce does."""

    async def send(self, key: bytes | None = None, value: bytes = b"") -> asyncio.Future[None]:
        raise KafkaTimeoutError("no broker")


async def test_outcomes_the_broker_did_not_take_leave_their_batch_unacknowledged() -> None:
    """A failed publish must raise (the batch is judged again after the restart),
    not be skipped as a judging failure; the calls already paid are counted."""
    topics, _, _ = fake_topics()
    topics = dataclasses.replace(topics, outcomes=cast(Any, UnreachableTopic()))
    spend = REGISTRY.get_sample_value("omnirouter_judge_spend_usd_total") or 0.0
    with pytest.raises(KafkaTimeoutError):
        await judge_events(batch(), FixedJudge(Verdict(score=0.6, cost_usd=0.01)), 1.0, topics)
    paid = REGISTRY.get_sample_value("omnirouter_judge_spend_usd_total")
    assert paid == pytest.approx(spend + 3 * 0.01)


async def test_a_response_no_outcome_can_hold_costs_its_verdict_not_the_batch() -> None:
    """A query id over the outcome's 200 characters raised ValidationError out of
    the batch, which (unacknowledged) was judged and paid again on every restart."""
    long_id = ModelResponse(query_id="q" * 201, model="m", pool="p", response="r")
    assert verdict_outcome(long_id, Verdict(score=0.5, cost_usd=0.01)) is None
    topics, outcomes, _ = fake_topics()
    raws = [r.model_dump_json().encode() for r in [*responses(1), long_id]]
    judge = FixedJudge(Verdict(score=0.6, cost_usd=0.01))
    await judge_events([event(raw, i) for i, raw in enumerate(raws)], judge, 1.0, topics)
    assert [Outcome.model_validate_json(v).query_id for _, v in outcomes.sent] == ["q0"]
