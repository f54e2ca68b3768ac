"""One OpenAI-compatible /v1/chat/completions call, as the model worker and the judge make it.

Both go through the `openai` client, built here from their settings: its own
retries (exponential backoff, `Retry-After` honoured) handle HTTP 429, 5xx,
connection errors and timeouts. What comes back is read leniently, since servers
and proxies differ: a call ends as a `ChatReply`, with the answer text when the
reply held one, the token counts it reported, or the error, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import openai
from pydantic import SecretStr

from workers.config import ModelPrice


def chat_client(
    base_url: str, api_key: SecretStr, timeout_seconds: float, max_retries: int
) -> openai.AsyncOpenAI:
    """The client for one API. The key goes only into the Authorization header;
    servers without authentication get a placeholder (the client needs a key)."""
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key.get_secret_value() or "unused",
        timeout=timeout_seconds,
        max_retries=max_retries,
    )


@dataclass(frozen=True)
class ChatReply:
    """What one call gave: `error` when it failed (after the client's retries);
    else the first choice's text (None: the reply held none) and the token
    counts the reply reported (None: not reported, or not a count)."""

    text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None

    def cost(self, price: ModelPrice | None) -> float | None:
        """The call's cost at `price`; None (unknown, not free) without a price or counts,
        or where the product overflows (an absurd price: an Outcome holds finite
        costs only, and the worker would stop on its batch)."""
        if price is None or self.input_tokens is None or self.output_tokens is None:
            return None
        cost = price.cost(float(self.input_tokens), float(self.output_tokens))
        return cost if math.isfinite(cost) else None


def describe(exc: Exception, api: str) -> str:
    """What went wrong, without the request (it holds the prompt) or the key."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} from the {api}"
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out calling the {api}"
    return f"{type(exc).__name__} calling the {api}"


# The most tokens a reply's count may name: the outcomes table's token columns are
# 32-bit. A larger count (a server's -1 read as unsigned) is no count: its outcome
# would be refused by the writer, usage and all, and one beyond a float's range
# would raise pricing it.
MAX_TOKEN_COUNT = 2**31 - 1


def _text(content: Any) -> str | None:
    """A message's content as text: a list of text parts (some servers) is joined;
    a list without one (a refusal part) holds no text."""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        texts = [p for p in parts if isinstance(p, str)]
        return "".join(texts) if texts else None
    return content if isinstance(content, str) else None


def _count(usage: Any, name: str) -> int | None:
    value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
    return value if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT else None


def read_reply(completion: Any) -> ChatReply:
    """The text and usage of what the client returned. The client does not
    validate replies: a proxy's HTML page comes back as a str, a JSON list as a
    list, and any field may be missing, null or of another type."""
    try:
        content = completion.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        content = None
    usage = getattr(completion, "usage", None)
    return ChatReply(
        _text(content), _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    )


async def ask(
    client: openai.AsyncOpenAI, api: str, model: str, prompt: str, **options: Any
) -> ChatReply:
    """One user message to `model`; `api` names the API in the error ("model API").
    A body announced as JSON that is not (a ValueError from the client), or is
    nested too deeply to parse (RecursionError), is an error too."""
    try:
        completion = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], **options
        )
    except (openai.OpenAIError, ValueError, RecursionError) as exc:
        return ChatReply(error=describe(exc, api))
    return read_reply(completion)
