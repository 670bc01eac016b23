# SPDX-License-Identifier: Apache-2.0
"""The OpenAI-compatible HTTP front door of an ``EPDCluster`` (FastAPI).

``build_app(cluster, settings)`` serves ``POST /v1/chat/completions`` and ``/v1/completions``
(streamed as server-sent events or not), ``GET /v1/models``, ``/health`` and ``/metrics``.
Requests go to ``EPDCluster.submit``; streamed tokens come back through its ``on_token``
callback (the cluster's receiver thread), handed to the event loop thread-safely.

Every failure is an OpenAI-style error body: bad input is a 4xx (never a 500), a full queue a
503 with ``Retry-After``, a worker's failure a 500 naming it. A client that goes away aborts
its request in every worker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from epdrt.runtime.request import Request as ClusterRequest
from epdrt.runtime.request import RequestError, RequestResult
from epdrt.serve.chat import ChatRenderer
from epdrt.serve.detok import IncrementalText
from epdrt.serve.metrics import ServerMetrics
from epdrt.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
)

#: HTTP status of a failed request, by ``RequestResult.error_kind``.
STATUS_OF = {"invalid": 400, "overloaded": 503, "unavailable": 503, "timeout": 504}
#: How often a waiting non-streamed request checks that its client is still there (seconds).
DISCONNECT_POLL_S = 0.1


@dataclass
class ServeSettings:
    """What ``epdrt serve`` configures beyond the cluster."""

    served_model_name: str
    api_key: str | None = None
    chat_template: str | None = None  # the template's text (None: the model has none)
    allowed_media: Path | None = None
    max_queued: int = 256
    max_body_bytes: int = 64 << 20
    default_max_tokens: int = 256


def build_app(cluster, settings: ServeSettings) -> FastAPI:
    """The app serving ``cluster`` (a launched ``EPDCluster``; the caller shuts it down)."""
    app = FastAPI(title="epdrt", docs_url=None, redoc_url=None)
    pre = cluster.pre
    renderer = ChatRenderer(
        pre.adapter.tokenizer, settings.chat_template, pre.adapter.image_placeholder,
        allowed_media=settings.allowed_media, max_image_bytes=cluster.config.max_image_bytes,
    )  # fmt: skip
    metrics = ServerMetrics(cluster)
    created = int(time.time())
    eos = frozenset(pre.spec.eos_token_ids)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        key = settings.api_key
        guarded = key is not None and request.url.path.startswith("/v1/")
        if guarded and request.headers.get("authorization") != f"Bearer {key}":
            exc = ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                           kind="authentication_error")  # fmt: skip
            return JSONResponse(exc.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = cluster.load()["workers"]
        dead = sorted(n for n, w in workers.items() if not w["alive"])
        body = {"status": "ok" if not dead else "degraded", "dead_workers": dead}
        return JSONResponse(body, status_code=200 if not dead else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": settings.served_model_name, "object": "model", "created": created,
            "owned_by": "epdrt", "max_model_len": pre.spec.max_context,
        }  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = decode_body(await _body(request, settings.max_body_bytes), ChatCompletionRequest)
        _check_model(body.model, settings)
        prompt, images = renderer.render(body.messages)
        return await _complete(request, body, prompt, images, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = decode_body(await _body(request, settings.max_body_bytes), CompletionRequest)
        _check_model(body.model, settings)
        return await _complete(request, body, body.prompt, [], chat=False)

    async def _complete(
        http: Request,
        body: ChatCompletionRequest | CompletionRequest,
        prompt: str,
        images: list[bytes],
        *,
        chat: bool,
    ) -> Response:
        if cluster.load()["queued"] >= settings.max_queued:
            raise ApiError(503, f"more than {settings.max_queued} requests wait: retry later",
                           kind="overloaded", headers={"Retry-After": "1"})  # fmt: skip
        limit = body.output_limit()
        if limit is not None and limit <= 0:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        req_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            request = ClusterRequest(
                prompt, list(images), limit or settings.default_max_tokens, id=req_id,
                sampling=body.sampling(), stop=body.stop_strings(),
            )  # fmt: skip
        except RequestError as exc:
            raise ApiError(400, str(exc)) from exc
        answer = _Answer(req_id, body.model, chat, created=int(time.time()))
        loop = asyncio.get_running_loop()
        if not body.stream:
            future = await loop.run_in_executor(None, cluster.submit, request)
            result = await _await_result(http, future, req_id)
            metrics.observe(result)
            _raise_if_failed(result)
            return JSONResponse(answer.full(result, _finish_reason(result, request, eos)))
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def on_token(_: str, token: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        # Off the event loop: submit decodes and preprocesses the images and tokenizes.
        future = await loop.run_in_executor(None, cluster.submit, request, on_token)
        if future.done() and future.result().error is not None:  # refused before it started
            metrics.observe(future.result())
            _raise_if_failed(future.result())
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _stream(request, future, tokens, answer, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _await_result(http: Request, future, req_id: str) -> RequestResult:
        """The request's result; aborts it if the client goes away first."""
        waiting = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiting.result()
            if await http.is_disconnected():
                cluster.abort(req_id)  # the result says "aborted"
                return await waiting

    async def _stream(
        request: ClusterRequest,
        future,
        tokens: asyncio.Queue[int | None],
        answer: _Answer,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The answer's server-sent events: a piece of text per token as it comes (never half
        a character, never past a stop string), then the rest, the finish reason and usage."""
        text = IncrementalText(pre.decode, request.stop)
        try:
            if answer.chat:
                yield answer.event(answer.delta_chunk({"role": "assistant", "content": ""}))
            while (token := await tokens.get()) is not None:
                piece = text.add(token)
                if piece:
                    yield answer.event(answer.delta_chunk({"content": piece}))
            result = future.result()
            metrics.observe(result)
            if result.error is not None:
                yield answer.event(_error_of(result).body())
            else:
                rest = text.finish(result.text)
                finish = _finish_reason(result, request, eos)
                yield answer.event(answer.delta_chunk({"content": rest} if rest else {}, finish))
                if include_usage:
                    yield answer.event(answer.usage_chunk(result))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed early): free its request
            if not future.done():
                cluster.abort(request.id)  # settles the future ("aborted") before it returns
                metrics.observe(future.result(timeout=DISCONNECT_POLL_S))

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_model(model: str, settings: ServeSettings) -> None:
    if model != settings.served_model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves"
                       f" {settings.served_model_name!r}", param="model",
                       kind="not_found_error")  # fmt: skip


def _error_of(result: RequestResult) -> ApiError:
    status = STATUS_OF.get(result.error_kind or "", 500)
    kind = "invalid_request_error" if status == 400 else "server_error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return ApiError(status, result.error or "failed", kind=kind, headers=headers)


def _raise_if_failed(result: RequestResult) -> None:
    if result.error is not None:
        raise _error_of(result)


def _finish_reason(result: RequestResult, request: ClusterRequest, eos: frozenset[int]) -> str:
    """ "length" when the request ran to its token limit and its last token did not end it
    (an EOS or stop token), else "stop"."""
    sampling = request.sampling
    enders = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else eos)
    tokens = result.token_ids
    if len(tokens) >= request.max_new_tokens and tokens[-1] not in enders:
        return "length"
    return "stop"


@dataclass
class _Answer:
    """The shape of one request's answer objects (chat or text completion)."""

    id: str
    model: str
    chat: bool
    created: int

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, result: RequestResult, finish_reason: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": finish_reason}  # fmt: skip
            out = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish_reason}
            out = self._base("text_completion")
        return {**out, "choices": [choice], "usage": _usage(result)}

    def delta_chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, result: RequestResult) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [], "usage": _usage(result)}

    @staticmethod
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(result: RequestResult) -> dict:
    prompt = result.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": len(result.token_ids),
            "total_tokens": prompt + len(result.token_ids)}  # fmt: skip
