# SPDX-License-Identifier: Apache-2.0
"""The client side of ``epdrt serve`` for load generators (``bench serve``, ``bench soak``):
``httpx`` pool limits, a streamed chat request's body, and its server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


def client_limits() -> httpx.Limits:
    """``httpx`` pool limits for load generators: no connection cap, and idle connections
    dropped well before the server would close them (``background.KEEP_ALIVE_S``: no send on a
    closing connection)."""
    import httpx

    return httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)


def chat_stream_body(model: str, content: list[dict], max_tokens: int) -> dict:
    """A streamed chat request of one user message that generates exactly ``max_tokens``
    (``ignore_eos``), with the usage in its last chunk."""
    return {
        "model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of a streamed answer, in order, up to ``[DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: ") :])
