# SPDX-License-Identifier: Apache-2.0
"""Stage profiles: latency models per stage, memory facts and transfer cost of one model on one
device, saved as JSON with a schema version.

Units everywhere: seconds, bytes, tokens. "Image tokens" are the multimodal (MM) tokens an image
becomes in the LM's input sequence.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from epdrt.errors import InvalidArgument

SCHEMA_VERSION = 1
SOURCES = ("measured", "estimated", "synthetic")


def _segment(knots: Sequence[float], x: float) -> tuple[int, float]:
    """Index i of the segment [knots[i], knots[i+1]] used for x and x's position t in it.

    Outside the knots the end segments are extended, so t < 0 or t > 1 extrapolates linearly.
    """
    n = len(knots)
    if n == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(knots, x) - 1, 0), n - 2)
    return i, (x - knots[i]) / (knots[i + 1] - knots[i])


def _check_knots(name: str, knots: Sequence[float]) -> None:
    if len(knots) < 1 or any(b <= a for a, b in itertools.pairwise(knots)):
        raise InvalidArgument(f"{name}: knots must be non-empty and strictly increasing")


@dataclass(frozen=True)
class PiecewiseLinear:
    """y(x), linear between knots and extended linearly beyond the end knots; never below 0.

    Args:
        knots: strictly increasing x values.
        values: y at each knot.
    """

    knots: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_knots("PiecewiseLinear", self.knots)
        if len(self.values) != len(self.knots):
            raise InvalidArgument("PiecewiseLinear: one value per knot")

    @classmethod
    def constant(cls, value: float) -> PiecewiseLinear:
        return cls((0.0,), (float(value),))

    def __call__(self, x: float) -> float:
        if len(self.knots) == 1:
            return max(self.values[0], 0.0)
        i, t = _segment(self.knots, x)
        return max(self.values[i] + t * (self.values[i + 1] - self.values[i]), 0.0)

    def sum_arithmetic(self, x0: float, dx: float, n: int) -> float:
        """``sum(self(x0 + j * dx) for j in range(n))`` in closed form (dx >= 0).

        NOTE: the terms are not clamped at 0; callers use it on models that stay positive.
        """
        if n <= 0:
            return 0.0
        k, v = self.knots, self.values
        if len(k) == 1:
            return n * v[0]
        last = len(k) - 2
        # Segment of the first term; later terms only move right (dx >= 0).
        i = min(max(bisect.bisect_right(k, x0) - 1, 0), last)
        total, ja = 0.0, 0
        while True:
            jb = n  # the last segment, or every term equal
            if i < last and dx > 0:
                jb = min(max(math.ceil((k[i + 1] - x0) / dx), ja), n)
            cnt = jb - ja
            if cnt:
                slope = (v[i + 1] - v[i]) / (k[i + 1] - k[i])
                total += cnt * (v[i] + slope * (x0 - k[i])) + slope * dx * (ja + jb - 1) * cnt / 2
            if jb >= n:
                return total
            ja = jb
            i += 1

    def scaled(self, factor: float) -> PiecewiseLinear:
        """The same model with every value times ``factor``."""
        return PiecewiseLinear(self.knots, tuple(v * factor for v in self.values))

    def to_dict(self) -> dict[str, Any]:
        return {"knots": list(self.knots), "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PiecewiseLinear:
        return cls(tuple(float(v) for v in d["knots"]), tuple(float(v) for v in d["values"]))


@dataclass(frozen=True)
class Bilinear:
    """z(x, y) on a grid of knots: bilinear inside, extended linearly outside; never below 0.

    Args:
        x_knots, y_knots: strictly increasing grid coordinates.
        values: ``values[i][j]`` is z at ``(x_knots[i], y_knots[j])``.
    """

    x_knots: tuple[float, ...]
    y_knots: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        _check_knots("Bilinear x", self.x_knots)
        _check_knots("Bilinear y", self.y_knots)
        if len(self.values) != len(self.x_knots) or any(
            len(row) != len(self.y_knots) for row in self.values
        ):
            raise InvalidArgument("Bilinear: values must be len(x_knots) x len(y_knots)")

    @classmethod
    def constant(cls, value: float) -> Bilinear:
        return cls((0.0,), (0.0,), ((float(value),),))

    @classmethod
    def from_function(cls, x_knots: Sequence[float], y_knots: Sequence[float], fn: Any) -> Bilinear:
        """The grid of ``fn(x, y)`` at every pair of knots."""
        xs, ys = tuple(float(x) for x in x_knots), tuple(float(y) for y in y_knots)
        return cls(xs, ys, tuple(tuple(float(fn(x, y)) for y in ys) for x in xs))

    def __call__(self, x: float, y: float) -> float:
        v = self.values
        i, t = _segment(self.x_knots, x)
        j, u = _segment(self.y_knots, y)
        i1 = i + 1 if len(self.x_knots) > 1 else i
        j1 = j + 1 if len(self.y_knots) > 1 else j
        z0 = v[i][j] + u * (v[i][j1] - v[i][j])
        z1 = v[i1][j] + u * (v[i1][j1] - v[i1][j])
        return max(z0 + t * (z1 - z0), 0.0)

    def at_x(self, x: float) -> PiecewiseLinear:
        """z(x, .) as a piecewise-linear function of y (not clamped at 0)."""
        v = self.values
        i, t = _segment(self.x_knots, x)
        i1 = i + 1 if len(self.x_knots) > 1 else i
        row = tuple(v[i][j] + t * (v[i1][j] - v[i][j]) for j in range(len(self.y_knots)))
        return PiecewiseLinear(self.y_knots, row)

    def scaled(self, factor: float) -> Bilinear:
        """The same model with every value times ``factor``."""
        return Bilinear(
            self.x_knots, self.y_knots, tuple(tuple(v * factor for v in row) for row in self.values)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "x_knots": list(self.x_knots),
            "y_knots": list(self.y_knots),
            "values": [list(r) for r in self.values],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bilinear:
        return cls(
            tuple(float(v) for v in d["x_knots"]),
            tuple(float(v) for v in d["y_knots"]),
            tuple(tuple(float(v) for v in r) for r in d["values"]),
        )


def _hat_weights(knots: Sequence[float], x: float) -> list[tuple[int, float]]:
    """Weights of the knot values that give the piecewise-linear value at x."""
    if len(knots) == 1:
        return [(0, 1.0)]
    i, t = _segment(knots, x)
    return [(i, 1.0 - t), (i + 1, t)]


def fit_piecewise_linear(
    xs: Sequence[float], ys: Sequence[float], breakpoints: Sequence[float]
) -> PiecewiseLinear:
    """Least-squares continuous piecewise-linear fit with knots at ``breakpoints``.

    Args:
        xs, ys: samples (for example batch tokens and seconds).
        breakpoints: strictly increasing knots; a knot with no samples nearby gets the
            minimum-norm value, so put knots where there are samples.
    """
    knots = tuple(float(b) for b in breakpoints)
    _check_knots("fit_piecewise_linear", knots)
    if len(xs) != len(ys) or not xs:
        raise InvalidArgument("fit_piecewise_linear: xs and ys must be equally long, not empty")
    a = np.zeros((len(xs), len(knots)))
    for r, x in enumerate(xs):
        for k, w in _hat_weights(knots, float(x)):
            a[r, k] += w
    sol = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)[0]
    return PiecewiseLinear(knots, tuple(float(v) for v in sol))


def fit_bilinear(
    xs: Sequence[float],
    ys: Sequence[float],
    zs: Sequence[float],
    x_knots: Sequence[float],
    y_knots: Sequence[float],
) -> Bilinear:
    """Least-squares bilinear fit of samples ``z = f(x, y)`` on the given grid of knots."""
    xk, yk = tuple(float(v) for v in x_knots), tuple(float(v) for v in y_knots)
    _check_knots("fit_bilinear x", xk)
    _check_knots("fit_bilinear y", yk)
    if not (len(xs) == len(ys) == len(zs)) or not xs:
        raise InvalidArgument("fit_bilinear: xs, ys, zs must be equally long, not empty")
    a = np.zeros((len(xs), len(xk) * len(yk)))
    for r, (x, y) in enumerate(zip(xs, ys)):
        for i, wx in _hat_weights(xk, float(x)):
            for j, wy in _hat_weights(yk, float(y)):
                a[r, i * len(yk) + j] += wx * wy
    sol = np.linalg.lstsq(a, np.asarray(zs, dtype=float), rcond=None)[0]
    grid = sol.reshape(len(xk), len(yk))
    return Bilinear(xk, yk, tuple(tuple(float(v) for v in row) for row in grid))


@dataclass(frozen=True)
class MemoryProfile:
    """Memory facts per GPU, in bytes.

    Args:
        device_bytes: total device memory.
        usable_fraction: share of ``device_bytes`` the runtime may use.
        overhead_bytes: per-GPU fixed cost (CUDA context, allocator slack, graphs).
        encode_weight_bytes: vision tower + projector weights.
        lm_weight_bytes: language-model weights (shared by prefill and decode on one GPU).
        encode_activation_bytes_per_token: peak encode activations per image token in a batch.
        prefill_activation_bytes_per_token: peak prefill activations per token in a batch.
        kv_bytes_per_token: KV cache of one token over all layers.
        mm_bytes_per_token: one MM token (hidden size x dtype bytes).
    """

    device_bytes: int
    encode_weight_bytes: int
    lm_weight_bytes: int
    kv_bytes_per_token: float
    mm_bytes_per_token: float
    encode_activation_bytes_per_token: float = 0.0
    prefill_activation_bytes_per_token: float = 0.0
    overhead_bytes: int = 0
    usable_fraction: float = 0.9

    @property
    def usable_bytes(self) -> float:
        return self.device_bytes * self.usable_fraction - self.overhead_bytes


@dataclass(frozen=True)
class TransferProfile:
    """Cost of moving bytes between two GPUs: ``latency_s + bytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True)
class Overheads:
    """Fixed costs of the serving runtime outside the model's batches, in seconds.

    Args:
        prepare_s, prepare_per_image_s: the router's preprocessing of one request (image
            decoding and resizing, tokenization), ``prepare_s + images * prepare_per_image_s``,
            before any worker sees it.
        message_s: one control message between two processes, one way (serialize, send,
            wake the receiver waiting in poll, deserialize).
        wake_s, wake_tau_s: a worker that starts a batch after idling ``gap`` seconds takes
            ``wake_s * (1 - exp(-gap / wake_tau_s))`` longer (caches refilled, clocks ramped
            up; on a shared CPU host, other processes ran meanwhile). Measured on the model's
            batches, so not charged to the router (its CPU is in ``route_s``).
        request_s: further latency of every request before its first token that none of the
            above accounts for (routing and dispatching it, the router recording the first
            token); calibrated on an idle deployment (``epdrt bench planner``), else 0.
        step_s: further work of every decode step beyond the model's (the worker's loop
            around it, its tokens message); calibrated the same way, else 0.
        request_spread: how that latency varies from request to request: quantiles at 0,
            0.05, ..., 1 of the calibration's residuals minus ``request_s`` (seconds); the
            simulator draws each request's ``request_s + spread`` (at least 0); () for none.
        route_s: the router's further CPU work per request beyond preprocessing (routing it,
            encoding and sending its messages and image tensors, taking in its tokens and
            result), CPU seconds; calibrated from the router process's CPU time on an idle
            deployment, else 0. The simulator adds it to the router's preprocessing, so on a
            CPU host it takes its share of the cores the workers run on.
        token_message_s: the router's CPU per tokens message of a decode step (one per step
            of each decode worker: receive, decode, deliver every token in it); calibrated
            with ``route_s`` (from requests served one at a time and all at once), else 0.

    NOTE: on a GPU serving a 7B-class model these are a few milliseconds against batches of
    tens to hundreds; for a tiny model on a CPU they are most of TTFT, which is why the
    profile carries them.
    """

    prepare_s: float = 0.0
    prepare_per_image_s: float = 0.0
    message_s: float = 0.0
    wake_s: float = 0.0
    wake_tau_s: float = 0.0
    request_s: float = 0.0
    step_s: float = 0.0
    request_spread: tuple[float, ...] = ()
    route_s: float = 0.0
    token_message_s: float = 0.0

    def prepare(self, num_images: int) -> float:
        return self.prepare_s + num_images * self.prepare_per_image_s

    def router_work(self, num_images: int) -> float:
        """The router's CPU seconds for one request: preprocessing plus ``route_s``."""
        return self.prepare(num_images) + self.route_s

    def wake(self, gap_s: float) -> float:
        """Extra seconds of work started after ``gap_s`` idle seconds."""
        if self.wake_s <= 0 or gap_s <= 0:
            return 0.0
        if self.wake_tau_s <= 0:
            return self.wake_s
        return self.wake_s * -math.expm1(-gap_s / self.wake_tau_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prepare_s": self.prepare_s,
            "prepare_per_image_s": self.prepare_per_image_s,
            "message_s": self.message_s,
            "wake_s": self.wake_s,
            "wake_tau_s": self.wake_tau_s,
            "request_s": self.request_s,
            "step_s": self.step_s,
            "request_spread": list(self.request_spread),
            "route_s": self.route_s,
            "token_message_s": self.token_message_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Overheads:
        scalars = {k: float(d.get(k, 0.0)) for k in cls().to_dict() if k != "request_spread"}
        return cls(**scalars, request_spread=tuple(float(v) for v in d.get("request_spread", ())))


@dataclass(frozen=True)
class StageProfile:
    """Latency, memory and transfer models of one model on one device.

    Args:
        encode: seconds of one encode batch against (images in batch, image tokens per image).
        prefill: seconds of one request's prefill against its tokens.
        prefill_added: seconds one more request of ``t`` tokens adds to a prefill batch
            (measured on right-padded batches); None: ``prefill(t) - prefill(0)``, the
            request's own work without the fixed cost of a call.
        decode: seconds of one decode step against (sequences in batch, context tokens summed
            over the batch).
        source: "measured", "estimated" or "synthetic"; say which, plainly.
        notes: how the numbers were obtained (the arithmetic, for an estimate).
        samples: the raw measurements behind a measured profile (optional).
        overheads: the runtime's fixed costs outside batches (zero unless measured).
        jitter: run-to-run spread of batch latencies: quantiles at 0, 0.05, ..., 1 of a run's
            time over the median of its shape (the latency models hold medians); () for none.
            The simulator draws each batch's factor from it.
    """

    name: str
    source: str
    device: str
    encode: Bilinear
    prefill: PiecewiseLinear
    decode: Bilinear
    memory: MemoryProfile
    transfer: TransferProfile
    notes: str = ""
    samples: dict[str, Any] = field(default_factory=dict)
    overheads: Overheads = field(default_factory=Overheads)
    jitter: tuple[float, ...] = ()
    prefill_added: PiecewiseLinear | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidArgument(f"source must be one of {SOURCES}, got {self.source!r}")
        j = self.jitter
        if j and (len(j) < 2 or any(b < a for a, b in itertools.pairwise(j)) or j[0] <= 0):
            raise InvalidArgument("jitter must be positive, non-decreasing quantiles")

    def encode_latency(self, num_images: int, tokens_per_image: float) -> float:
        return self.encode(num_images, tokens_per_image)

    def prefill_latency(self, num_tokens: int) -> float:
        return self.prefill(num_tokens)

    def prefill_batch_latency(self, prompts: Sequence[int], padded: bool = False) -> float:
        """Seconds of one prefill batch of requests with these prompt lengths (tokens): the
        longest request's ``prefill`` plus what each other one adds (``prefill_added``); with
        ``padded`` every request counts at the longest length. (A packed batch is not
        ``prefill(sum(t_i))``: its requests do not attend to each other.)
        """
        if not prompts:
            return 0.0
        longest = max(prompts)
        others = [longest] * (len(prompts) - 1) if padded else sorted(prompts)[:-1]
        if self.prefill_added is not None:
            added = sum(self.prefill_added(t) for t in others)
        else:
            added = sum(self.prefill(t) for t in others) - len(others) * self.prefill(0)
        return self.prefill(longest) + max(added, 0.0)

    def decode_step_latency(self, batch_size: int, context_tokens: int) -> float:
        return self.decode(batch_size, context_tokens)

    def with_batches_scaled(self, factor: float) -> StageProfile:
        """This profile with every batch latency (encode, prefill, decode) times ``factor``:
        the same device running ``factor`` times slower (for example a shared host whose
        speed a probe measured to have moved since the profile was taken)."""
        if not factor > 0:
            raise InvalidArgument(f"factor must be positive, got {factor}")
        return replace(
            self,
            encode=self.encode.scaled(factor),
            prefill=self.prefill.scaled(factor),
            prefill_added=None if self.prefill_added is None else self.prefill_added.scaled(factor),
            decode=self.decode.scaled(factor),
        )

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "source": self.source,
            "device": self.device,
            "notes": self.notes,
            "encode_latency_s": {"x": "images_in_batch", "y": "tokens_per_image"}
            | self.encode.to_dict(),
            "prefill_latency_s": {"x": "tokens"} | self.prefill.to_dict(),
            "prefill_added_s": None
            if self.prefill_added is None
            else {"x": "tokens_per_request"} | self.prefill_added.to_dict(),
            "decode_step_latency_s": {"x": "batch_size", "y": "total_context_tokens"}
            | self.decode.to_dict(),
            "memory": {
                "device_bytes": m.device_bytes,
                "usable_fraction": m.usable_fraction,
                "overhead_bytes": m.overhead_bytes,
                "encode_weight_bytes": m.encode_weight_bytes,
                "lm_weight_bytes": m.lm_weight_bytes,
                "encode_activation_bytes_per_token": m.encode_activation_bytes_per_token,
                "prefill_activation_bytes_per_token": m.prefill_activation_bytes_per_token,
                "kv_bytes_per_token": m.kv_bytes_per_token,
                "mm_bytes_per_token": m.mm_bytes_per_token,
            },
            "transfer": {
                "latency_s": self.transfer.latency_s,
                "bytes_per_s": self.transfer.bytes_per_s,
            },
            "overheads": self.overheads.to_dict(),
            "jitter_quantiles": list(self.jitter),
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageProfile:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InvalidArgument(
                f"profile schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        try:
            m = d["memory"]
            return cls(
                name=str(d["name"]),
                source=str(d["source"]),
                device=str(d["device"]),
                notes=str(d.get("notes", "")),
                encode=Bilinear.from_dict(d["encode_latency_s"]),
                prefill=PiecewiseLinear.from_dict(d["prefill_latency_s"]),
                decode=Bilinear.from_dict(d["decode_step_latency_s"]),
                memory=MemoryProfile(
                    device_bytes=int(m["device_bytes"]),
                    usable_fraction=float(m.get("usable_fraction", 0.9)),
                    overhead_bytes=int(m.get("overhead_bytes", 0)),
                    encode_weight_bytes=int(m["encode_weight_bytes"]),
                    lm_weight_bytes=int(m["lm_weight_bytes"]),
                    encode_activation_bytes_per_token=float(
                        m.get("encode_activation_bytes_per_token", 0.0)
                    ),
                    prefill_activation_bytes_per_token=float(
                        m.get("prefill_activation_bytes_per_token", 0.0)
                    ),
                    kv_bytes_per_token=float(m["kv_bytes_per_token"]),
                    mm_bytes_per_token=float(m["mm_bytes_per_token"]),
                ),
                transfer=TransferProfile(
                    float(d["transfer"]["latency_s"]), float(d["transfer"]["bytes_per_s"])
                ),
                samples=dict(d.get("samples", {})),
                overheads=Overheads.from_dict(d.get("overheads", {})),
                jitter=tuple(float(v) for v in d.get("jitter_quantiles", ())),
                prefill_added=PiecewiseLinear.from_dict(d["prefill_added_s"])
                if d.get("prefill_added_s")
                else None,
            )
        except KeyError as e:
            raise InvalidArgument(f"profile is missing the key {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StageProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped in ``epdrt/planner/profiles/`` (without ``.json``)."""
    root = resources.files("epdrt.planner") / "profiles"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | os.PathLike[str]) -> StageProfile:
    """Loads a profile from a JSON path, or a built-in one by name (see builtin_profiles())."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return StageProfile.load(path)
    name = str(name_or_path)
    if name not in builtin_profiles():
        raise InvalidArgument(
            f"no profile file {name!r} and no built-in profile of that name "
            f"(built-in: {', '.join(builtin_profiles()) or 'none'})"
        )
    text = (resources.files("epdrt.planner") / "profiles" / f"{name}.json").read_text()
    return StageProfile.from_dict(json.loads(text))
