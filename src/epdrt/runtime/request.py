# SPDX-License-Identifier: Apache-2.0
"""What users submit and what they get back."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from epdrt.errors import EpdrtError
from epdrt.runtime.sampling import GREEDY, SamplingParams

ImageSource = "str | Path | bytes | PIL.Image.Image"

_ids = itertools.count()


class RequestError(EpdrtError):
    """A request was rejected (bad image, too many images, prompt too long, ...)."""


@dataclass
class Request:
    """A prompt in the model's own format (one placeholder per image) and its images.

    Images are file paths, encoded bytes (PNG, JPEG, ...) or PIL images. ``sampling`` picks
    the tokens (default greedy, as ``generate()``).
    """

    prompt: str
    images: list[Any] = field(default_factory=list)
    max_new_tokens: int = 16
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    sampling: SamplingParams = GREEDY
    #: strings that end the request as soon as its text holds one; the text returned stops
    #: before it (the tokens include the one that completed it)
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise RequestError(
                f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}"
            )


@dataclass
class RequestResult:
    """Generated tokens and timings of one request (``error`` set when it failed).

    Times in seconds: ``ttft_s`` submit to first token, ``tpot_s`` mean time per output token
    after the first, ``encode_s`` encoder time spent on this request's images (a batch's time
    is shared among its images by token count), ``e2e_s`` submit to last token.
    """

    id: str
    token_ids: list[int]
    text: str
    ttft_s: float | None
    tpot_s: float | None
    encode_s: float
    e2e_s: float | None
    error: str | None = None
    #: Why it failed: "invalid" (the request itself: a bad image, too long for the model or
    #: the caches), "overloaded" (the router's queue is full: retry later), "unavailable" (no
    #: live worker, or the cluster is shut down), "aborted", "timeout" or "failed" (a worker
    #: failed it); None when it succeeded.
    error_kind: str | None = None
    #: the prompt's tokens (image tokens included), once tokenized
    prompt_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "token_ids": self.token_ids, "text": self.text, "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s, "encode_s": self.encode_s, "e2e_s": self.e2e_s,
            "error": self.error, "error_kind": self.error_kind,
            "prompt_tokens": self.prompt_tokens,
        }  # fmt: skip
