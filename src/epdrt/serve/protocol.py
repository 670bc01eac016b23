# SPDX-License-Identifier: Apache-2.0
"""The OpenAI request bodies epdrt serves, decoded strictly, and its error bodies.

Bodies are decoded with ``msgspec`` into the structs below: a wrong type, a missing field or an
unsupported value is an ``ApiError`` (HTTP 400 with an OpenAI-style body), never a 500. Fields
OpenAI clients commonly send that change nothing here (``user``, ``logprobs: false``, zero
penalties) are accepted; values epdrt cannot honour (``n > 1``, penalties, log-probabilities)
are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from epdrt.errors import InvalidArgument
from epdrt.runtime.sampling import SamplingParams


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.kind, "param": self.param,
                "code": self.status,
            }
        }  # fmt: skip


class ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content: ``{"type": "text", "text"}`` or ``{"type":
    "image_url", "image_url": {"url"}}``."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    """Fields chat and text completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ApiError(400, f"{name} is not supported (must be 0)", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options needs stream: true", param="stream_options")

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        return stop

    def sampling(self) -> SamplingParams:
        """The request's sampling (greedy when temperature is absent or 0)."""
        fields: dict[str, Any] = {"ignore_eos": self.ignore_eos}
        for name in ("temperature", "top_p", "top_k", "seed", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        try:
            return SamplingParams(**fields)
        except InvalidArgument as exc:
            raise ApiError(400, str(exc)) from exc


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if not self.messages:
            raise ApiError(400, "messages must not be empty", param="messages")

    def output_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(_Common, kw_only=True):
    prompt: str
    logprobs: int | None = None
    echo: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None or self.echo:
            raise ApiError(400, "logprobs and echo are not supported", param="logprobs")

    def output_limit(self) -> int | None:
        return self.max_tokens


T = TypeVar("T", ChatCompletionRequest, CompletionRequest)


def decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` as a ``kind``; ApiError 400 naming what is wrong."""
    try:
        request = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    request.check_supported()  # type: ignore[attr-defined]
    return request
