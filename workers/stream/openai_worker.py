"""The OpenAI-compatible model worker: answers routed queries through /v1/chat/completions.

Publishes the answer to omnirouter.responses and the usage (tokens, cost from
ROUTER_MODEL_PRICES, latency, error) to omnirouter.outcomes; the quality
score comes later, from the user's feedback. Calls go through the `openai`
client as the judge's do (workers/stream/chat_api.py), retried on HTTP 429, 5xx,
connection errors and timeouts (OPENAI_MAX_RETRIES). The API key is sent only
in the Authorization header and never logged; prompts are logged only when
OPENAI_LOG_PROMPTS is true.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from schemas import Assignment
from workers.config import Settings
from workers.stream.chat_api import ask, chat_client
from workers.stream.model_worker import Answer

log = logging.getLogger(__name__)

API = "model API"


class ChatAnswerer:
    """Answers through one `openai` client, OPENAI_MAX_CONCURRENCY calls at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limit = asyncio.Semaphore(settings.openai_max_concurrency)
        self.client = chat_client(
            settings.openai_base_url,
            settings.openai_api_key,
            settings.openai_timeout_seconds,
            settings.openai_max_retries,
        )

    async def answer_one(self, assignment: Assignment) -> Answer:
        """The answer, or the error that stands for it: a failed call (after the
        client's retries) or a reply without answer text. A reply's reported
        tokens are counted, and priced, even without text: the call was paid."""
        upstream = self.settings.openai_model_map.get(assignment.model, assignment.model)
        if self.settings.openai_log_prompts:
            log.info("query %s -> %s: %s", assignment.query_id, upstream, assignment.text)
        started = time.perf_counter()
        async with self.limit:
            reply = await ask(self.client, API, upstream, assignment.text)
        error = reply.error
        if error is None and reply.text is None:
            error = f"no answer text in the {API}'s reply"
        if error:
            log.warning("query %s on %s: %s", assignment.query_id, assignment.model, error)
        return Answer(
            response=reply.text,
            error=error,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            cost_usd=reply.cost(self.settings.router_model_prices.get(assignment.model)),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def answer(self, assignments: Sequence[Assignment]) -> list[Answer]:
        return list(await asyncio.gather(*(self.answer_one(a) for a in assignments)))

    async def close(self) -> None:
        await self.client.close()
