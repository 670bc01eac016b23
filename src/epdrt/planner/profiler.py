# SPDX-License-Identifier: Apache-2.0
"""Measuring a stage profile on the current device through a small ``StageRunner`` protocol,
and fitting the piecewise-linear models a StageProfile holds.

The runner owns the model and the device; this module owns the sweep, the timing (warm-up,
median of repeats, a synchronize before every clock read) and the fits. Model adapters
provide runners; tests use a fake runner with an injected clock.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from epdrt.errors import InvalidArgument
from epdrt.planner.profile import (
    MemoryProfile,
    StageProfile,
    TransferProfile,
    fit_bilinear,
    fit_piecewise_linear,
)


@dataclass(frozen=True)
class RunnerFacts:
    """Static facts a runner knows about its model and device (bytes)."""

    device: str
    device_bytes: int
    encode_weight_bytes: int
    lm_weight_bytes: int
    kv_bytes_per_token: float
    mm_bytes_per_token: float
    overhead_bytes: int = 0


class StageRunner(Protocol):
    """Runs single batches of each stage on the device being profiled.

    Calls may return before the device finishes; the profiler calls ``synchronize()`` before
    it reads the clock.
    """

    def facts(self) -> RunnerFacts: ...

    def tokens_per_image(self, image_size: int) -> int:
        """MM tokens an image of ``image_size`` x ``image_size`` pixels becomes."""
        ...

    def encode(self, num_images: int, image_size: int) -> None:
        """One encode batch of ``num_images`` images of ``image_size`` pixels square."""
        ...

    def prefill(self, num_tokens: int) -> None:
        """One prefill batch of ``num_tokens`` tokens in total."""
        ...

    def decode(self, batch_size: int, context_tokens: int) -> None:
        """One decode step of ``batch_size`` sequences of ``context_tokens`` tokens each."""
        ...

    def synchronize(self) -> None: ...

    def reset_peak_memory(self) -> None: ...

    def peak_memory_bytes(self) -> int:
        """Peak device memory allocated since the last reset_peak_memory() (bytes)."""
        ...


@dataclass(frozen=True)
class ProfileGrid:
    """Batch shapes to measure. Decode contexts are per sequence."""

    encode_images: tuple[int, ...] = (1, 2, 4, 8, 16)
    image_sizes: tuple[int, ...] = (224, 448, 896)
    prefill_tokens: tuple[int, ...] = (128, 512, 1024, 2048, 4096, 8192)
    decode_batch: tuple[int, ...] = (1, 8, 32, 64, 128)
    decode_context: tuple[int, ...] = (256, 1024, 4096)
    warmup: int = 1
    repeats: int = 5


Clock = Callable[[], float]


def time_call(
    fn: Callable[[], None], sync: Callable[[], None], clock: Clock, warmup: int, repeats: int
) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


def _peak(runner: StageRunner, fn: Callable[[], None]) -> int:
    """Bytes the call adds to peak memory over what was allocated before it."""
    runner.synchronize()
    runner.reset_peak_memory()
    base = runner.peak_memory_bytes()
    fn()
    runner.synchronize()
    return max(runner.peak_memory_bytes() - base, 0)


def _slope_through_origin(xs: Sequence[float], ys: Sequence[float]) -> float:
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    den = float(x @ x)
    return float(x @ y) / den if den > 0 else 0.0


def fit_transfer(sizes_bytes: Sequence[float], seconds: Sequence[float]) -> TransferProfile:
    """Least-squares ``seconds = latency + bytes / bandwidth`` (latency clamped at >= 0)."""
    if len(sizes_bytes) != len(seconds) or len(sizes_bytes) < 2:
        raise InvalidArgument("fit_transfer needs at least two (bytes, seconds) samples")
    a = np.column_stack([np.ones(len(sizes_bytes)), np.asarray(sizes_bytes, dtype=float)])
    lat, per_byte = np.linalg.lstsq(a, np.asarray(seconds, dtype=float), rcond=None)[0]
    if per_byte <= 0:
        raise InvalidArgument("transfer samples do not grow with size; cannot fit a bandwidth")
    return TransferProfile(max(float(lat), 0.0), 1.0 / float(per_byte))


def transfer_from_records(records: Iterable[Mapping[str, Any]]) -> TransferProfile:
    """Fits transfer cost from the transfer benchmark's JSON-lines records.

    Uses records with ``bench == "transfer"``, ``metric == "GB/s"`` and the payload size in
    ``extra["bytes"]``: seconds = bytes / (value * 1e9).
    """
    sizes, secs = [], []
    for r in records:
        nbytes = (r.get("extra") or {}).get("bytes")
        if r.get("bench") == "transfer" and r.get("metric") == "GB/s" and nbytes and r["value"]:
            sizes.append(float(nbytes))
            secs.append(float(nbytes) / (float(r["value"]) * 1e9))
    if len(sizes) < 2:
        raise InvalidArgument(
            "need >= 2 transfer records with metric 'GB/s' and extra.bytes (payload size)"
        )
    return fit_transfer(sizes, secs)


def load_transfer_records(path: str) -> TransferProfile:
    """transfer_from_records over a JSON-lines file."""
    with open(path) as f:
        return transfer_from_records(json.loads(line) for line in f if line.strip())


def measure_profile(
    runner: StageRunner,
    transfer: TransferProfile,
    *,
    name: str,
    grid: ProfileGrid | None = None,
    clock: Clock = time.perf_counter,
    usable_fraction: float = 0.9,
    progress: Callable[[str], None] | None = None,
) -> StageProfile:
    """Measures every stage over ``grid`` and fits a StageProfile (``source="measured"``).

    Args:
        transfer: the link's cost, from the transfer benchmark (load_transfer_records).
        clock: seconds; injected by tests.

    Models fitted: encode on the (images, tokens per image) grid; prefill piecewise linear
    with knots at the measured token counts; decode piecewise linear in batch size (knots at
    the measured sizes) and linear in total context tokens. Activation bytes per image token
    and per prefill token are least-squares slopes of the peak-memory increase.
    """
    g = grid or ProfileGrid()
    facts = runner.facts()
    sync = runner.synchronize

    def say(msg: str) -> None:
        if progress:
            progress(msg)

    enc_rows: list[list[float]] = []
    enc_mem: list[tuple[float, float]] = []
    for size in g.image_sizes:
        tpi = runner.tokens_per_image(size)
        for n in g.encode_images:

            def fn(n: int = n, size: int = size) -> None:
                runner.encode(n, size)

            s = time_call(fn, sync, clock, g.warmup, g.repeats)
            enc_rows.append([n, tpi, s])
            enc_mem.append((n * tpi, _peak(runner, fn)))
        say(f"encode {size}px ({tpi} tokens/image) measured")
    pre_rows: list[list[float]] = []
    pre_mem: list[tuple[float, float]] = []
    for t in g.prefill_tokens:

        def pfn(t: int = t) -> None:
            runner.prefill(t)

        pre_rows.append([t, time_call(pfn, sync, clock, g.warmup, g.repeats)])
        pre_mem.append((t, _peak(runner, pfn)))
    say("prefill measured")
    dec_rows: list[list[float]] = []
    for b in g.decode_batch:
        for c in g.decode_context:

            def dfn(b: int = b, c: int = c) -> None:
                runner.decode(b, c)

            dec_rows.append([b, b * c, time_call(dfn, sync, clock, g.warmup, g.repeats)])
    say("decode measured")

    tpis = sorted({r[1] for r in enc_rows})
    encode = fit_bilinear(
        [r[0] for r in enc_rows],
        [r[1] for r in enc_rows],
        [r[2] for r in enc_rows],
        sorted(set(g.encode_images)),
        tpis,
    )
    prefill = fit_piecewise_linear(
        [r[0] for r in pre_rows], [r[1] for r in pre_rows], sorted(set(g.prefill_tokens))
    )
    max_total = max(r[1] for r in dec_rows)
    decode = fit_bilinear(
        [r[0] for r in dec_rows],
        [r[1] for r in dec_rows],
        [r[2] for r in dec_rows],
        sorted(set(g.decode_batch)),
        [0.0, float(max_total)] if max_total > 0 else [0.0],
    )
    memory = MemoryProfile(
        device_bytes=facts.device_bytes,
        usable_fraction=usable_fraction,
        overhead_bytes=facts.overhead_bytes,
        encode_weight_bytes=facts.encode_weight_bytes,
        lm_weight_bytes=facts.lm_weight_bytes,
        encode_activation_bytes_per_token=_slope_through_origin(*zip(*enc_mem)),
        prefill_activation_bytes_per_token=_slope_through_origin(*zip(*pre_mem)),
        kv_bytes_per_token=facts.kv_bytes_per_token,
        mm_bytes_per_token=facts.mm_bytes_per_token,
    )
    return StageProfile(
        name=name,
        source="measured",
        device=facts.device,
        notes=(
            f"measured: median of {g.repeats} runs after {g.warmup} warm-up per shape; "
            "encode on the measured (images, tokens/image) grid, prefill piecewise linear, "
            "decode piecewise linear in batch and linear in total context"
        ),
        encode=encode,
        prefill=prefill,
        decode=decode,
        memory=memory,
        transfer=transfer,
        samples={"encode": enc_rows, "prefill": pre_rows, "decode": dec_rows},
    )
