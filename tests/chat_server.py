"""A small OpenAI-compatible /v1/chat/completions server on 127.0.0.1 for tests.

It runs in a thread of its own (its own event loop), so a worker subprocess or
an async client in the test can call it. `reply` decides each answer from the
request body; every body and Authorization header is kept for the test to check.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from workers.services import free_port

Reply = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


def completion(
    content: str | None, prompt_tokens: int = 40, completion_tokens: int = 10
) -> web.Response:
    """A 200 chat completion answering `content`, with its usage."""
    return web.json_response(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "test",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


class ChatServer:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.authorizations: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.add(request.headers.get("Authorization", ""))
        return await self.reply(body)

    def __enter__(self) -> ChatServer:
        application = web.Application()
        application.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(application)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(runner.setup(), self._loop).result()
        # A slow reply still running at the end must not hold the test for long.
        site = web.TCPSite(runner, "127.0.0.1", self.port, shutdown_timeout=1.0)
        asyncio.run_coroutine_threadsafe(site.start(), self._loop).result()
        self._runner = runner
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
