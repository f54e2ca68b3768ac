"""The LLM judge: asks an OpenAI-compatible /v1/chat/completions API to grade answers.

The rubric (JUDGE_RUBRIC, else the built-in one) asks for a score from 0 to 10 on
a last line "Score: N"; `parse_score` reads it and maps it to [0, 1]. A reply it
cannot read with confidence gives no score, never a guessed one. The client's
own retries (JUDGE_MAX_RETRIES, exponential backoff) handle HTTP 429, 5xx,
connection errors and timeouts; a call that still fails gives no score. The API
key goes only into the Authorization header, and neither it nor a question or
an answer is ever logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence

import openai

from schemas import ModelResponse
from workers.config import Settings
from workers.stream.chat_api import ask, chat_client
from workers.stream.judge import Verdict

log = logging.getLogger(__name__)

API = "judge API"
SCALE_MAX = 10.0  # the rubric's scale: 0 to 10
PLACEHOLDERS = ("{question}", "{answer}")

BUILT_IN_RUBRIC = """You are grading an answer to a question. Judge only whether the \
answer is correct and answers the question; ignore its style and length.

Question:
{question}

Answer:
{answer}

Give at most three sentences of reasoning, then end with one line of the form
Score: N
where N is a whole number from 0 (wrong, or no answer) to 10 (fully correct)."""


def rubric_in_force(rubric: str) -> str:
    """JUDGE_RUBRIC, else the built-in rubric; one without both placeholders is a
    configuration error, raised at start."""
    if not rubric.strip():
        return BUILT_IN_RUBRIC
    missing = [p for p in PLACEHOLDERS if p not in rubric]
    if missing:
        raise ValueError(
            f"JUDGE_RUBRIC must contain {' and '.join(PLACEHOLDERS)} (missing: "
            f"{', '.join(missing)}) and ask for a score from 0 to 10 on a line 'Score: N'"
        )
    return rubric


def fill(rubric: str, question: str, answer: str) -> str:
    """The rubric with its placeholders replaced in one pass (a question holding
    '{answer}' stays as it is; other braces need no escaping)."""
    values = {"question": question, "answer": answer}
    return re.sub(r"\{(question|answer)\}", lambda match: values[match[1]], rubric)


_DIGITS = r"\d+(?:\.\d+)?"
_PER = r"(?:/|out\s+of)"  # "7/10", "7 out of 10"
_DASH = r"(?:[-\u2013\u2014]|\bto\b)"  # "1-5", "1 to 5"
# A number not glued to more digits, letters or a percent sign ("8e3", "80%", "8,5").
_NUMBER = rf"(?<![\w.])([-+]?{_DIGITS})(?![.,]?\d|[^\W\d]|%)"
_SCALE_TOP = rf"({_DIGITS})(?![.,/]?\d|[^\W\d]|%)"  # the 10 of "7/10"
_OVER = rf"(?:\s*{_PER}\s*{_SCALE_TOP})?"
# A second number after the first ("7-8", "7 to 8", "7 or 8"): a range, not a score.
_RANGE = rf"(\s*(?:{_DASH}|\bor\b)\s*[-+]?\d)?"
_DECOR = r"[\s*_\"'`]*"
# Decoration within one line: a label's number is on its line ("Rating:\n1. ..." is
# a list, not a rating of 1).
_INLINE_DECOR = r"[ \t*_\"'`]*"
_PAREN = rf"((?:\([^)\n]*\){_DECOR})?)"  # "Score (0-10): 3"
# Words before "score" that make it the judge's verdict, or its revision of one.
_REVISION = r"(?:final|overall|revised|updated|corrected|adjusted)"
# The rubric's own form: a line that starts with "Score:" or "Score =" (markdown
# around it allowed); group 1 is a parenthesis before the colon, group 2 the
# rest of the line.
_SCORE_LINE = re.compile(
    rf"^[ \t*_\"'`#>-]*(?:{_REVISION}[ \t]+)?score\b{_DECOR}{_PAREN}[:=]([^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_LINE_VALUE = re.compile(rf"{_DECOR}{_NUMBER}{_OVER}{_RANGE}")
_LABELLED = re.compile(
    # One run of decoration between required tokens: no ambiguous backtracking.
    rf"\b(score|rating|grade)\b{_INLINE_DECOR}{_PAREN}"
    rf"(?:(?:[:=]|\bis\b|\bof\b){_INLINE_DECOR})?{_NUMBER}{_OVER}{_RANGE}",
    re.IGNORECASE,
)
# Another scale named beside a score: right after it ("4 of 5", "4 (out of 5)"),
# in the label's parenthesis ("Score (out of 5): 4", "Rating (1-5): 4"), or as "on
# a scale of 1 to 5" within _SCALE_REACH characters after it. The top of such a
# scale must be the rubric's 10 ("Score (1-10): 7" is read). Numbers elsewhere
# ("3 of 4 steps", "GPT-4", "2019-2020") name no scale.
_SCALE_REACH = 60
_SCALE_AFTER = re.compile(
    rf"[\s*_]*(?:(?:points?|stars?|marks?)\s+)?\(?\s*(?:{_PER}|of)\s*({_DIGITS})", re.IGNORECASE
)
_SCALE_IN_PAREN = re.compile(
    rf"{_PER}\s*({_DIGITS})|({_DIGITS})\s*{_DASH}\s*({_DIGITS})", re.IGNORECASE
)
_SCALE_OF = re.compile(
    rf"\bscale\s+(?:of|from)\s+{_DIGITS}\s*{_DASH}\s*({_DIGITS})"
    rf"|(?<![\w.]){_DIGITS}\s*{_DASH}\s*({_DIGITS})[\s-]*(?:point\s+)?scale\b",
    re.IGNORECASE,
)
# "final score: N" (or "revised score: N", ...) mid-line, after the last Score
# line's number: a revision.
_FINAL_SCORE = re.compile(rf"\b{_REVISION}\s+score\b{_DECOR}[:=]{_DECOR}{_NUMBER}", re.IGNORECASE)
_SCORE_COLON = re.compile(rf"\bscore\b{_DECOR}[:=]", re.IGNORECASE)
_FRACTION = re.compile(rf"{_NUMBER}\s*{_PER}\s*10(?![.,/]?\d|[^\W\d]|%)", re.IGNORECASE)
_BARE = re.compile(rf"^{_DECOR}{_NUMBER}(?:\s*/\s*10)?[\s*_\"'`.]*$")


def _on_scale(value: float, over: float | None = None) -> float | None:
    if over is not None and over != SCALE_MAX:
        return None  # another scale than the one asked for: no guess
    if not math.isfinite(value) or not 0.0 <= value <= SCALE_MAX:
        return None
    return value / SCALE_MAX


def _value(number: str, over: str | None, range_: str | None) -> float | None:
    """One matched number on the scale; a range ("7-8") is no score, not a guess."""
    if range_:
        return None
    return _on_scale(float(number), float(over) if over else None)


def _other_scale(paren: str, after: str) -> bool:
    """Does the label's parenthesis, or the text right after the score, name a scale
    other than the rubric's 0-10?"""
    near = after[:_SCALE_REACH]
    tops = [over or top for over, _, top in _SCALE_IN_PAREN.findall(paren)]
    if found_after := _SCALE_AFTER.match(near):
        tops.append(found_after[1])
    if found_of := _SCALE_OF.search(near):
        tops.append(found_of[1] or found_of[2])
    return any(float(top) != SCALE_MAX for top in tops)


def _line_score(paren: str, rest: str) -> float | None:
    """The score on a "Score:" line; None when the line holds no single number, or
    names another scale beside it ("Score (out of 5): 4", "Score: 4 of 5")."""
    found = _LINE_VALUE.match(rest)
    if not found or _other_scale(paren, rest[found.end() :]):
        return None
    return _value(*found.groups())


def _labelled_score(match: re.Match[str]) -> float | None:
    """A prose mention's score ("rating of 4"); None beside another scale
    ("Rating (1-5): 4", "a score of 4 out of 5 points")."""
    paren, number, over, range_ = match.groups()[1:]
    after = match.string[match.end() : match.end() + _SCALE_REACH].split("\n", 1)[0]
    return None if _other_scale(paren, after) else _value(number, over, range_)


def _prose_score(reply: str) -> float | None:
    """For a reply with no "Score:" line: the "score is N" mentions if they all
    agree, else the "rating N" ones, else the "grade N" ones, else "N/10" if every
    such fraction agrees, else a reply that is just a number."""
    labelled = [(m[1].lower(), _labelled_score(m)) for m in _LABELLED.finditer(reply)]
    for wanted in ("score", "rating", "grade"):
        found = {value for label, value in labelled if label == wanted}
        if found:
            return found.pop() if len(found) == 1 else None
        if wanted == "score" and _SCORE_COLON.search(reply):
            return None  # "score:" with no number after it: the judge did not say
    fractions = {float(m[1]) for m in _FRACTION.finditer(reply)}
    if fractions:
        return _on_scale(fractions.pop()) if len(fractions) == 1 else None
    bare = _BARE.match(reply.strip())
    return _on_scale(float(bare[1])) if bare else None


def parse_score(reply: str | None) -> float | None:
    """The judge's score mapped to [0, 1], or None when the reply does not give one
    clearly. A line starting "Score: N" (or "Score = N", "Score: N/10") is what the
    rubric asks for, so the last such line decides alone: prose after it ("a score
    of 10 would need...") is reasoning about the scale, not the verdict, and a judge
    that writes a second Score line has revised itself. Only without such a line is
    prose read (`_prose_score`). A range, or a score off the 0-10 scale, is none;
    so is a "final score: N" later in the text that disagrees with the last Score
    line ("...so my final score: 3"): a revision the rubric's form did not hold."""
    if not reply or not reply.strip():
        return None
    lines = list(_SCORE_LINE.finditer(reply))
    if not lines:
        return _prose_score(reply)
    last = lines[-1]
    score = _line_score(last[1], last[2])
    later = {_on_scale(float(m[1])) for m in _FINAL_SCORE.finditer(reply, last.start(2))}
    return score if later <= {score} else None


def failed_verdict(exc: BaseException) -> Verdict:
    """An unforeseen failure as the response's verdict, named by its type alone (its
    message or traceback may hold the question and answer)."""
    log.warning("judging failed: %s", type(exc).__name__)
    return Verdict(error=f"{type(exc).__name__} while judging")


class ChatJudge:
    """Grades answers through an OpenAI-compatible chat API, JUDGE_MAX_CONCURRENCY
    calls at a time."""

    def __init__(self, settings: Settings, client: openai.AsyncOpenAI | None = None) -> None:
        self.rubric = rubric_in_force(settings.judge_rubric)
        self.model = settings.judge_model
        self.price = settings.judge_price
        self.retries = settings.judge_max_retries
        self.limit = asyncio.Semaphore(settings.judge_max_concurrency)
        self.client = client or chat_client(
            settings.judge_base_url,
            settings.judge_api_key,
            settings.judge_timeout_seconds,
            settings.judge_max_retries,
        )

    async def score(self, responses: Sequence[ModelResponse]) -> list[Verdict]:
        """One verdict per response; one that failed in an unforeseen way is that
        response's error, not the loss of its batch's other verdicts."""
        results = await asyncio.gather(
            *(self.score_one(r) for r in responses), return_exceptions=True
        )
        return [r if isinstance(r, Verdict) else failed_verdict(r) for r in results]

    async def score_one(self, response: ModelResponse) -> Verdict:
        if not response.text or not response.response:
            return Verdict(error="no question or no answer to judge")
        prompt = fill(self.rubric, response.text, response.response)
        async with self.limit:
            reply = await ask(self.client, API, self.model, prompt, temperature=0)
        if reply.error:
            log.warning(
                "judging %s on %s: %s (after up to %d retries)",
                response.query_id,
                response.model,
                reply.error,
                self.retries,
                extra={"query_id": response.query_id},
            )
            return Verdict(error=reply.error)
        cost = reply.cost(self.price)
        score = parse_score(reply.text)
        if score is None:
            log.info(
                "the judge's reply on %s with %s held no score it could read",
                response.query_id,
                response.model,
                extra={"query_id": response.query_id},
            )
            return Verdict(cost_usd=cost, error="no score in the judge's reply")
        return Verdict(score=score, cost_usd=cost)

    async def close(self) -> None:
        await self.client.close()
