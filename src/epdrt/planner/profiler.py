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
    Overheads,
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

    def prefill(self, num_tokens: int, num_requests: int = 1) -> None:
        """One prefill batch of ``num_requests`` requests of ``num_tokens`` tokens each."""
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
    """Batch shapes to measure. Decode contexts are per sequence; a decode shape whose
    sequences (context plus the steps the timing adds) exceed ``max_decode_tokens`` in all is
    skipped (a batch size needs two contexts left to fit)."""

    encode_images: tuple[int, ...] = (1, 2, 4, 8, 16)
    image_sizes: tuple[int, ...] = (224, 448, 896)
    prefill_tokens: tuple[int, ...] = (128, 512, 1024, 2048, 4096, 8192)
    #: batch sizes (requests) measured at each prompt length whose batch stays within
    #: ``max_prefill_batch_tokens``; () skips batches (``prefill_added`` stays None).
    prefill_batch: tuple[int, ...] = (4, 16)
    max_prefill_batch_tokens: int = 32768
    decode_batch: tuple[int, ...] = (1, 8, 32, 64, 128)
    decode_context: tuple[int, ...] = (256, 1024, 4096)
    warmup: int = 1
    repeats: int = 5
    #: a shape whose ``repeats`` timed runs take less than ``min_seconds`` in all is run
    #: again until they do, up to ``max_repeats`` runs (fast shapes are the noisiest).
    min_seconds: float = 0.0
    max_repeats: int = 0
    max_decode_tokens: int | None = None

    @property
    def decode_growth(self) -> int:
        """Tokens a decode shape's sequences can grow by while it is measured (each step
        appends one): its warm-up, its most timed runs and one."""
        return self.warmup + max(self.repeats, self.max_repeats) + 1

    def decode_shapes(self) -> list[tuple[int, int]]:
        """(batch, context) pairs to measure, batch sizes with fewer than two contexts
        dropped (the decode model is linear in context per batch size)."""
        extra = self.decode_growth
        out = []
        for b in self.decode_batch:
            cs = [
                c
                for c in self.decode_context
                if self.max_decode_tokens is None or b * (c + extra) <= self.max_decode_tokens
            ]
            if len(cs) >= min(2, len(self.decode_context)):
                out += [(b, c) for c in cs]
        return out


Clock = Callable[[], float]


def time_runs(
    fn: Callable[[], None],
    sync: Callable[[], None],
    clock: Clock,
    warmup: int,
    repeats: int,
    spread: list[float] | None = None,
    min_seconds: float = 0.0,
    max_repeats: int = 0,
) -> list[float]:
    """Seconds of each timed run of ``fn``, after ``warmup`` untimed ones: ``repeats`` runs,
    then more while they add up to less than ``min_seconds``, up to ``max_repeats``.

    Args:
        spread: when given, the first ``repeats`` runs' (at least 2) times over the median
            of all are appended to it (every shape weighs the same in the jitter, however
            many runs it took).
    """
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    most = max(repeats, max_repeats, 1)
    while len(times) < max(repeats, 1) or (len(times) < most and sum(times) < min_seconds):
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    med = statistics.median(times)
    if spread is not None and med > 0 and len(times) > 1:
        spread.extend(t / med for t in times[: max(repeats, 2)])
    return times


JITTER_QUANTILES = tuple(i / 20 for i in range(21))


def jitter_quantiles(ratios: Sequence[float]) -> tuple[float, ...]:
    """Quantiles (at JITTER_QUANTILES) of run time over the median run time of its shape;
    () when there are too few runs to say."""
    if len(ratios) < 20:
        return ()
    return tuple(float(v) for v in np.quantile(np.asarray(ratios), JITTER_QUANTILES))


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


def _payload_bytes(r: Mapping[str, Any]) -> float | None:
    extra = r.get("extra") or {}
    nbytes = extra.get("payload_bytes", extra.get("bytes"))
    return float(nbytes) if nbytes else None


def transfer_from_records(
    records: Iterable[Mapping[str, Any]], transport: str | None = None
) -> TransferProfile:
    """Fits transfer cost from the transfer benchmark's JSON-lines records.

    One transfer's seconds against its payload: from the latency records (``metric == "us"``,
    one transfer alone) when they cover two or more payload sizes and grow with it, else from
    the bandwidth records (``metric == "GB/s"``: seconds = bytes / (value * 1e9)); on a busy
    host single small transfers can be slower than larger ones, streams are steadier. The
    payload size is ``extra["payload_bytes"]`` (or ``extra["bytes"]``).

    Args:
        transport: keep only records whose ``extra["transport"]`` is this (e.g. ``"ipc"``).
    """
    lat: dict[float, list[float]] = {}
    bw: dict[float, list[float]] = {}
    for r in records:
        nbytes = _payload_bytes(r)
        if r.get("bench") != "transfer" or not nbytes or not r.get("value"):
            continue
        if transport is not None and (r.get("extra") or {}).get("transport") != transport:
            continue
        if r.get("metric") == "us":
            lat.setdefault(nbytes, []).append(float(r["value"]) * 1e-6)
        elif r.get("metric") == "GB/s":
            bw.setdefault(nbytes, []).append(nbytes / (float(r["value"]) * 1e9))
    errors = []
    for chosen in (lat, bw):
        if len(chosen) < 2:
            continue
        sizes = sorted(chosen)
        try:
            return fit_transfer(sizes, [statistics.median(chosen[b]) for b in sizes])
        except InvalidArgument as exc:
            errors.append(str(exc))
    why = "".join(f"; {e}" for e in errors)
    raise InvalidArgument(
        "need transfer records ('us' latency or 'GB/s' bandwidth) at >= 2 payload sizes "
        f"(extra.payload_bytes) whose time grows with the payload{why}"
    )


def load_transfer_records(path: str, transport: str | None = None) -> TransferProfile:
    """transfer_from_records over a JSON-lines file."""
    with open(path) as f:
        return transfer_from_records((json.loads(line) for line in f if line.strip()), transport)


def measure_profile(
    runner: StageRunner,
    transfer: TransferProfile,
    *,
    name: str,
    grid: ProfileGrid | None = None,
    clock: Clock = time.perf_counter,
    usable_fraction: float = 0.9,
    progress: Callable[[str], None] | None = None,
    overheads: Overheads | None = None,
    notes: str = "",
) -> StageProfile:
    """Measures every stage over ``grid`` and fits a StageProfile (``source="measured"``).

    Args:
        transfer: the link's cost, from the transfer benchmark (load_transfer_records).
        clock: seconds; injected by tests.
        overheads: the runtime's fixed costs (model_runner.measure_overheads), if measured.
        notes: appended to the profile's notes (where the transfer cost came from, ...).

    Models fitted: encode on the (images, tokens per image) grid; prefill piecewise linear
    with knots at the measured token counts, and what each request past the first adds to a
    padded batch (piecewise linear in its tokens, from the batch sizes measured); decode
    piecewise linear in batch size (knots at the measured sizes) and linear in total context
    tokens. Activation bytes per image token and per prefill token are least-squares slopes of
    the peak-memory increase.
    """
    g = grid or ProfileGrid()
    facts = runner.facts()
    sync = runner.synchronize

    def say(msg: str) -> None:
        if progress:
            progress(msg)

    spread: list[float] = []  # timed runs over their shape's median

    def runs(fn: Callable[[], None]) -> list[float]:
        return time_runs(fn, sync, clock, g.warmup, g.repeats, spread, g.min_seconds, g.max_repeats)

    def median(fn: Callable[[], None]) -> float:
        return statistics.median(runs(fn))

    enc_rows: list[list[float]] = []
    enc_mem: list[tuple[float, float]] = []
    seen_tpi: set[int] = set()
    for size in g.image_sizes:
        tpi = runner.tokens_per_image(size)
        if tpi in seen_tpi:  # the processor maps this size to a measured token count
            continue
        seen_tpi.add(tpi)
        for n in g.encode_images:

            def fn(n: int = n, size: int = size) -> None:
                runner.encode(n, size)

            s = median(fn)
            enc_rows.append([n, tpi, s])
            enc_mem.append((n * tpi, _peak(runner, fn)))
        say(f"encode {size}px ({tpi} tokens/image) measured")
    pre_rows: list[list[float]] = []
    pre_mem: list[tuple[float, float]] = []
    for t in g.prefill_tokens:

        def pfn(t: int = t) -> None:
            runner.prefill(t)

        pre_rows.append([t, median(pfn)])
        pre_mem.append((t, _peak(runner, pfn)))
    say(f"prefill measured ({len(pre_rows)} sizes)")
    batch_rows: list[list[float]] = []
    for b in g.prefill_batch:
        for t in [t for t in g.prefill_tokens if b * t <= g.max_prefill_batch_tokens]:

            def bfn(t: int = t, b: int = b) -> None:
                runner.prefill(t, b)

            batch_rows.append([b, t, median(bfn)])
        say(f"prefill batch of {b} measured")
    dec_rows: list[list[float]] = []
    shapes = g.decode_shapes()
    if not shapes:
        raise InvalidArgument("no decode shape of the grid fits max_decode_tokens")
    for b in sorted({b for b, _ in shapes}):
        for c in [c for bb, c in shapes if bb == b]:

            def dfn(b: int = b, c: int = c) -> None:
                runner.decode(b, c)

            times = runs(dfn)
            # Each step appends a token: the median run saw the middle timed run's context.
            mid = c + g.warmup + (len(times) - 1) / 2
            dec_rows.append([b, b * mid, statistics.median(times)])
        say(f"decode batch {b} measured")

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
    prefill_added = None
    if batch_rows:
        # What each request past the first adds: (batch - one request's prefill) / (b - 1).
        lengths = sorted({r[1] for r in batch_rows})
        prefill_added = fit_piecewise_linear(
            [r[1] for r in batch_rows],
            [(r[2] - prefill(r[1])) / (r[0] - 1) for r in batch_rows],
            lengths,
        )
    max_total = max(r[1] for r in dec_rows)
    decode = fit_bilinear(
        [r[0] for r in dec_rows],
        [r[1] for r in dec_rows],
        [r[2] for r in dec_rows],
        sorted({r[0] for r in dec_rows}),
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
            f"measured: median of {g.repeats} runs after {g.warmup} warm-up per shape"
            + (
                f" (up to {g.max_repeats} runs until {g.min_seconds:g} s)"
                if g.min_seconds > 0 and g.max_repeats > g.repeats
                else ""
            )
            + "; "
            "encode on the measured (images, tokens/image) grid, prefill piecewise linear "
            "(and what each further request adds to a padded batch), "
            "decode piecewise linear in batch and linear in total context"
            + (f"; {notes}" if notes else "")
        ),
        encode=encode,
        prefill=prefill,
        decode=decode,
        memory=memory,
        transfer=transfer,
        samples={
            "encode": enc_rows,
            "prefill": pre_rows,
            "prefill_batch": batch_rows,
            "decode": dec_rows,
        },
        overheads=overheads or Overheads(),
        jitter=jitter_quantiles(spread),
        prefill_added=prefill_added,
    )
