# SPDX-License-Identifier: Apache-2.0
"""Workloads for the simulator: seeded Poisson arrivals with sampled request shapes, or a JSONL
trace replayed (and rescaled to any rate).

Trace lines: ``{"id": "r0", "arrival_s": 0.0, "num_images": 2, "image_tokens": 576,
"prompt_tokens": 80, "output_tokens": 128}``. ``image_tokens`` is the MM tokens of each image:
one integer (every image alike) or a list with one entry per image. ``prompt_tokens`` counts
text tokens only; the LM's input is ``prompt_tokens + sum(image_tokens)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epdrt.errors import InvalidArgument


@dataclass(frozen=True)
class Request:
    """One request. Times in seconds, sizes in tokens."""

    id: str
    arrival_s: float
    image_tokens: tuple[int, ...]  # MM tokens of each image, one entry per image
    prompt_tokens: int  # text tokens
    output_tokens: int  # tokens generated, >= 1 (the first comes from prefill)

    @property
    def num_images(self) -> int:
        return len(self.image_tokens)

    @property
    def input_tokens(self) -> int:
        """Tokens in the LM's input sequence: text plus every image's MM tokens."""
        return self.prompt_tokens + sum(self.image_tokens)

    def to_json(self) -> dict[str, object]:
        tokens: object = list(self.image_tokens)
        if self.image_tokens and len(set(self.image_tokens)) == 1:
            tokens = self.image_tokens[0]
        return {
            "id": self.id,
            "arrival_s": self.arrival_s,
            "num_images": self.num_images,
            "image_tokens": tokens if self.image_tokens else 0,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass(frozen=True)
class IntDist:
    """A distribution of non-negative integers: a weighted choice or an inclusive uniform range.

    Text forms (``parse``): ``"4"`` (constant), ``"2-8"`` (uniform on 2..8),
    ``"0:0.6,1:0.3,4:0.1"`` (value:weight pairs).
    """

    values: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    low: int = 0
    high: int = 0

    @classmethod
    def constant(cls, value: int) -> IntDist:
        return cls(values=(int(value),), weights=(1.0,))

    @classmethod
    def uniform(cls, low: int, high: int) -> IntDist:
        if high < low:
            raise InvalidArgument(f"uniform range {low}-{high} is empty")
        return cls(low=int(low), high=int(high))

    @classmethod
    def choice(cls, values: Sequence[int], weights: Sequence[float]) -> IntDist:
        if len(values) != len(weights) or not values or min(weights) < 0 or sum(weights) <= 0:
            raise InvalidArgument("choice: one non-negative weight per value, not all zero")
        total = float(sum(weights))
        return cls(values=tuple(int(v) for v in values), weights=tuple(w / total for w in weights))

    @classmethod
    def parse(cls, text: str) -> IntDist:
        text = text.strip()
        try:
            if ":" in text:
                pairs = [p.split(":") for p in text.split(",")]
                return cls.choice([int(v) for v, _ in pairs], [float(w) for _, w in pairs])
            if "-" in text[1:]:
                lo, hi = text.split("-", 1)
                return cls.uniform(int(lo), int(hi))
            return cls.constant(int(text))
        except ValueError as e:
            raise InvalidArgument(f"cannot parse distribution {text!r}: {e}") from None

    @property
    def mean(self) -> float:
        if self.values:
            return float(np.dot(self.values, self.weights))
        return (self.low + self.high) / 2

    @property
    def max(self) -> int:
        return max(self.values) if self.values else self.high

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` samples as an int64 array."""
        if self.values:
            return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, p=self.weights)
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)

    def __str__(self) -> str:
        if not self.values:
            return f"{self.low}-{self.high}"
        if len(self.values) == 1:
            return str(self.values[0])
        return ",".join(f"{v}:{w:.3g}" for v, w in zip(self.values, self.weights))


@dataclass(frozen=True)
class WorkloadSpec:
    """Request shape distributions: images per request, MM tokens per image, text prompt tokens
    and output tokens (at least 1)."""

    num_images: IntDist
    image_tokens: IntDist
    prompt_tokens: IntDist
    output_tokens: IntDist

    def describe(self) -> str:
        return (
            f"images/request {self.num_images}, tokens/image {self.image_tokens}, "
            f"prompt {self.prompt_tokens}, output {self.output_tokens}"
        )


class Workload:
    """A fixed list of requests whose arrival times rescale to any mean rate.

    Rescaling one list (common random numbers) keeps shapes and the arrival pattern fixed, so a
    simulated config's SLO attainment falls smoothly and almost monotonically with rate.
    """

    def __init__(self, requests: Sequence[Request], description: str = "") -> None:
        if not requests:
            raise InvalidArgument("a workload needs at least one request")
        self.requests: list[Request] = sorted(requests, key=lambda r: r.arrival_s)
        self.description = description
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s
        # Mean rate of the list as given (requests per second); n arrivals span n-1 gaps.
        self.base_rate = (len(self.requests) - 1) / span if span > 0 else float("inf")

    def __len__(self) -> int:
        return len(self.requests)

    def at_rate(self, rate: float) -> list[Request]:
        """The requests with arrival times scaled to a mean of ``rate`` requests per second."""
        if rate <= 0:
            raise InvalidArgument(f"rate must be positive, got {rate}")
        t0 = self.requests[0].arrival_s
        scale = self.base_rate / rate if np.isfinite(self.base_rate) else 0.0
        return [
            Request(r.id, (r.arrival_s - t0) * scale, r.image_tokens, r.prompt_tokens,
                    r.output_tokens)
            for r in self.requests
        ]  # fmt: skip

    def means(self) -> dict[str, float]:
        """Mean images, image tokens, input tokens and output tokens per request."""
        rs = self.requests
        n = len(rs)
        return {
            "num_images": sum(r.num_images for r in rs) / n,
            "image_tokens": sum(sum(r.image_tokens) for r in rs) / n,
            "input_tokens": sum(r.input_tokens for r in rs) / n,
            "output_tokens": sum(r.output_tokens for r in rs) / n,
        }


def poisson_workload(spec: WorkloadSpec, num_requests: int, seed: int = 0) -> Workload:
    """``num_requests`` requests with Poisson arrivals at 1 request/s (rescale with at_rate)."""
    if num_requests < 1:
        raise InvalidArgument("num_requests must be >= 1")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, size=num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    n_img = spec.num_images.sample(rng, num_requests)
    prompt = spec.prompt_tokens.sample(rng, num_requests)
    output = np.maximum(spec.output_tokens.sample(rng, num_requests), 1)
    all_tokens = spec.image_tokens.sample(rng, int(n_img.sum())).tolist()
    ends = np.cumsum(n_img).tolist()
    arrivals_l, prompt_l, output_l = arrivals.tolist(), prompt.tolist(), output.tolist()
    requests, start = [], 0
    for i in range(num_requests):
        tokens = tuple(all_tokens[start : ends[i]])
        start = ends[i]
        requests.append(Request(f"r{i}", arrivals_l[i], tokens, prompt_l[i], output_l[i]))
    w = Workload(requests, spec.describe())
    w.base_rate = 1.0 if num_requests > 1 else float("inf")
    return w


def _parse_trace_line(d: dict[str, object], lineno: int) -> Request:
    try:
        n = int(d.get("num_images", 0))  # type: ignore[arg-type]
        tok = d.get("image_tokens", 0)
        if isinstance(tok, list):
            image_tokens = tuple(int(t) for t in tok)
            if len(image_tokens) != n:
                raise InvalidArgument(f"trace line {lineno}: image_tokens has {len(tok)} != {n}")
        else:
            image_tokens = (int(tok),) * n  # type: ignore[call-overload]
        out = int(d["output_tokens"])  # type: ignore[call-overload]
        if out < 1:
            raise InvalidArgument(f"trace line {lineno}: output_tokens must be >= 1")
        return Request(
            str(d.get("id", lineno)),
            float(d["arrival_s"]),  # type: ignore[arg-type]
            image_tokens,
            int(d["prompt_tokens"]),  # type: ignore[call-overload]
            out,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InvalidArgument):
            raise
        raise InvalidArgument(f"trace line {lineno}: {e!r}") from None


def load_trace(path: str | os.PathLike[str]) -> Workload:
    """Reads a JSONL trace (see the module docstring); blank lines are skipped."""
    requests = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            requests.append(_parse_trace_line(json.loads(line), lineno))
    return Workload(requests, f"trace {Path(path).name}")


def save_trace(requests: Iterable[Request], path: str | os.PathLike[str]) -> None:
    """Writes requests as a JSONL trace that load_trace reads back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r.to_json()) + "\n" for r in requests))
