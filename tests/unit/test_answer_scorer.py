"""The answer scorer: final answers, agreement features, and calibrated posteriors
learned from hand-made outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from workers.routing.answer_scorer import (
    AnswerScorer,
    ProbeAnswers,
    agreement,
    answer_tokens,
    best_probe,
    final_answer,
    jaccard,
    response_text,
)


def test_final_answers_are_normalised_last_lines() -> None:
    assert final_answer("['C)\\n']") == "c"
    assert final_answer("Let me think.\nThe answer is B.\n\n") == "the answer is b"
    assert final_answer("  A  ") == final_answer("a.")
    assert final_answer(None) == ""
    assert final_answer("\n \n") == ""
    # A list of anything but strings is kept as text.
    assert response_text("[1, 2]") == "[1, 2]"
    assert response_text("['a', 'b']") == "a\nb"


def test_agreement_features_count_matching_answers_and_shared_tokens() -> None:
    answers = ProbeAnswers.of(
        [
            ["C", "c)", "D"],  # two of three agree
            ["", "", "x"],  # empty answers agree with nothing
        ]
    )
    agree = agreement(answers)
    assert agree[0, :, 0] == pytest.approx([0.5, 0.5, 0.0])
    assert agree[1, :, 0] == pytest.approx([0.0, 0.0, 0.0])
    assert jaccard(answer_tokens("def f(x): return x"), answer_tokens("def g(x): return x")) == (
        pytest.approx(3 / 5)
    )
    assert jaccard(frozenset(), frozenset()) == 0.0
    single = agreement(ProbeAnswers.of([["A"]]))
    assert single.shape == (1, 1, 2) and not single.any()


def hand_made(n: int, seed: int) -> tuple[ProbeAnswers, np.ndarray, np.ndarray, np.ndarray]:
    """Two probes (models 0, 1) and a dear model 2. When the probes agree the answer is
    right 90% of the time, when they disagree probe 0 is right 30% of the time; the
    dear model is right 95% (agree) or 60% (disagree) of the time."""
    rng = np.random.default_rng(seed)
    agree = rng.random(n) < 0.6
    responses = [["A", "A"] if a else ["A", "B"] for a in agree]
    truth = np.empty((n, 3))
    truth[:, 0] = rng.random(n) < np.where(agree, 0.9, 0.3)
    truth[:, 1] = np.where(agree, truth[:, 0], rng.random(n) < 0.4)
    truth[:, 2] = rng.random(n) < np.where(agree, 0.95, 0.6)
    predicted = np.full((n, 3), 0.7)
    return ProbeAnswers.of(responses), predicted, np.zeros(n, dtype=np.int64), truth


def test_posteriors_are_calibrated_on_held_out_outcomes() -> None:
    answers, predicted, clusters, truth = hand_made(3000, seed=1)
    scorer = AnswerScorer([0, 1], 3, 1).fit(answers, predicted, clusters, truth)
    test_answers, test_predicted, test_clusters, _ = hand_made(400, seed=2)
    posterior = scorer.posterior(test_answers, test_predicted, test_clusters)
    agree = np.array([row[0] == row[1] for row in test_answers.finals])
    assert posterior[agree, 0] == pytest.approx(0.9, abs=0.03)
    assert posterior[~agree, 0] == pytest.approx(0.3, abs=0.04)
    # What the probes say reaches the model not asked: disagreement marks a hard query.
    assert posterior[agree, 2] == pytest.approx(0.95, abs=0.03)
    assert posterior[~agree, 2] == pytest.approx(0.6, abs=0.05)
    # The held-out posteriors of the training rows are calibrated too.
    train_agree = np.array([row[0] == row[1] for row in answers.finals])
    assert scorer.held_out[train_agree, 0].mean() == pytest.approx(
        truth[train_agree, 0].mean(), abs=0.02
    )
    assert scorer.held_out[~train_agree, 0].mean() == pytest.approx(
        truth[~train_agree, 0].mean(), abs=0.03
    )


def test_unknown_outcomes_are_left_out_and_too_few_give_a_constant() -> None:
    answers, predicted, clusters, truth = hand_made(200, seed=3)
    truth[:100, 2] = np.nan
    truth[100:, 2] = 1.0
    truth[100:103, 2] = 0.0  # three bad answers: too few to learn from
    scorer = AnswerScorer([0, 1], 3, 1).fit(answers, predicted, clusters, truth)
    posterior = scorer.posterior(answers, predicted, clusters)
    assert np.unique(posterior[:, 2]).size == 1
    assert posterior[0, 2] == pytest.approx((97 + 1) / (100 + 2))
    assert np.isnan(scorer.held_out[:100, 2]).all()


def test_the_best_probe_is_the_one_most_likely_right() -> None:
    posterior = np.array([[0.2, 0.9, 0.99], [0.8, 0.1, 0.99]])
    assert best_probe(posterior, [0, 1]).tolist() == [1, 0]
