"""The OpenAI-compatible model worker: answers routed queries through /v1/chat/completions.

Publishes the answer to omnirouter.responses and the usage (tokens, cost from
ROUTER_MODEL_PRICES, latency, error) to omnirouter.outcomes; the quality
score comes later, from the user's feedback. The API key is sent only in the
Authorization header and never logged; prompts are logged only when
OPENAI_LOG_PROMPTS is true.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from schemas import Assignment
from workers.config import Settings
from workers.stream.model_worker import Answer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """What a chat completion reply gives the worker: the answer and its usage."""

    text: str
    input_tokens: int | None
    output_tokens: int | None


def read_completion(payload: Any) -> Completion:
    """The first choice's answer and the token counts, from a reply's JSON; ValueError
    when it holds no answer text (servers differ: content may be a list of text
    parts). A token count that is not a non-negative integer is unknown."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("no choices[0].message.content in the reply") from exc
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError(f"the reply's content is a {type(content).__name__}, not text")
    usage = payload.get("usage") if isinstance(payload, dict) else None
    usage = usage if isinstance(usage, dict) else {}

    def count(name: str) -> int | None:
        value = usage.get(name)
        return value if type(value) is int and value >= 0 else None

    return Completion(content, count("prompt_tokens"), count("completion_tokens"))


class ChatAnswerer:
    """Answers through one HTTP session to an OpenAI-style API."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_url = settings.openai_base_url.rstrip("/")
        self.limit = asyncio.Semaphore(settings.openai_max_concurrency)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Content-Type": "application/json"}
            key = self.settings.openai_api_key.get_secret_value()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            timeout = aiohttp.ClientTimeout(total=self.settings.openai_timeout_seconds)
            self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        return self._session

    async def answer_one(self, assignment: Assignment) -> Answer:
        upstream = self.settings.openai_model_map.get(assignment.model, assignment.model)
        body = {"model": upstream, "messages": [{"role": "user", "content": assignment.text}]}
        if self.settings.openai_log_prompts:
            log.info("query %s -> %s: %s", assignment.query_id, upstream, assignment.text)
        started = time.perf_counter()
        completion: Completion | None = None
        error: str | None = None
        async with self.limit:
            try:
                async with self.session().post(
                    f"{self.base_url}/chat/completions", json=body
                ) as reply:
                    if reply.status != 200:
                        error = f"HTTP {reply.status} from the model API"
                    else:
                        completion = read_completion(await reply.json())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = f"{type(exc).__name__} calling the model API"
        if error:
            log.warning("query %s on %s: %s", assignment.query_id, assignment.model, error)
        prompt_tokens = completion.input_tokens if completion else None
        completion_tokens = completion.output_tokens if completion else None
        return Answer(
            response=completion.text if completion else None,
            error=error,
            input_tokens=prompt_tokens,
            output_tokens=completion_tokens,
            cost_usd=self.cost(assignment.model, prompt_tokens, completion_tokens),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def answer(self, assignments: Sequence[Assignment]) -> list[Answer]:
        return list(await asyncio.gather(*(self.answer_one(a) for a in assignments)))

    def cost(
        self, model: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> float | None:
        price = self.settings.router_model_prices.get(model)
        if price is None or prompt_tokens is None or completion_tokens is None:
            return None
        return (
            prompt_tokens * price.input_per_mtok_usd + completion_tokens * price.output_per_mtok_usd
        ) / 1e6

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
