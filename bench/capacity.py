# SPDX-License-Identifier: Apache-2.0
"""What dedicating devices to each stage buys in memory: ``epd`` against ``aggregated`` and
``pd``, per device, under one memory budget.

Four quantities, each measured by really allocating (weights loaded, caches created, stage
forwards run), with the planner's arithmetic beside it:

1. peak memory of the device that runs the encoder, for one request of ``--encode-batch``
   images (its weights, its caches for that request, the peak activations of its stages);
2. the largest encoder batch (images) that fits the budget beside that device's weights;
3. the most images one request can carry before a device on its path runs out (MM tokens,
   the prompt's KV, the prefill and decode activations of that prompt);
4. the KV cache capacity (tokens) left on the prefill and the decode device.

Deployments (the planner's pools): ``aggregated`` N = encode+prefill+decode; ``pd``
P = encode+prefill, D = decode; ``epd`` E = encode, P = prefill, D = decode. Caches follow the
runtime: an MM-token cache where encode or prefill runs, a paged KV cache where prefill or
decode runs. Growth: caches grow chunk by chunk (the total doubling) until the budget or an
out-of-memory error, then back off by halving, and the result is confirmed by one cache of
the final size; an OOM is caught, the pool shrinks and the benchmark goes on.

On CPU the budget is enforced by a ledger of the bytes really allocated for each emulated
device (see ``bench/_capacity_probe.py``); on CUDA too, plus real ``OutOfMemoryError``.
Activation peaks are measured by real forwards up to ``--max-forward-images`` /
``--max-forward-tokens``; beyond that a line through the measured points is used and the
record says "extrapolated".

Without ``--model`` a config-only Qwen2-VL directory of ``--size`` shapes is written to a
temporary directory (random weights drawn at load; shapes, not outputs, matter here).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from epdrt.bench._capacity_probe import (
    Curve,
    DeviceOutOfMemory,
    GiB,
    Ledger,
    Meter,
    allocate,
    grow,
    is_oom,
    largest_fitting,
    module_bytes,
)
from epdrt.benchmarking import Record
from epdrt.cache.sizing import blocks_for

HELP = "memory per device, epd vs pd vs aggregated: encoder peak, encoder batch, images, KV"

MODES = ("aggregated", "pd", "epd")
#: (deployment, baseline) pairs reported, when both were run.
COMPARISONS = (("epd", "aggregated"), ("epd", "pd"), ("pd", "aggregated"))
#: Text tokens of a request besides its images (bytes of KV and activations count them).
TEXT_TOKENS = 32
QUANTITIES = {
    "encoder_peak_memory": ("encoder-device peak memory", "GiB", False),
    "max_encoder_batch": ("largest encoder batch", "images", True),
    "max_images_per_request": ("images per request (memory-bound)", "images", True),
    "kv_tokens_prefill": ("KV capacity on the prefill device", "tokens", True),
    "kv_tokens_decode": ("KV capacity on the decode device", "tokens", True),
}
#: Devices of each deployment as this benchmark lays it out (one per stage group: epd's E, P
#: and D; pd's E+P and D; aggregated's one), for the comparisons per GPU of the deployment.
DEPLOYMENT_GPUS = {"epd": 3, "pd": 2, "aggregated": 1}
#: Quantities that add up over a deployment's devices of that role (one device of each here).
PER_GPU = ("kv_tokens_decode", "max_encoder_batch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", help="model directory (default: a Qwen2-VL of --size shapes)")
    parser.add_argument(
        "--size", default="7b" if gpu else "2b", choices=("tiny", "2b", "7b"),
        help="Qwen2-VL shapes used without --model",
    )  # fmt: skip
    parser.add_argument(
        "--memory-budget", type=float, default=80.0 if gpu else 8.0,
        help="memory of each device, GiB (default: 80 on CUDA, 8 on CPU)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--dtype", help="float32 | float16 | bfloat16 (default: the config's)")
    parser.add_argument("--modes", default=",".join(MODES), help="deployments, comma-separated")
    parser.add_argument("--image-size", type=int, default=448, help="square test image, pixels")
    parser.add_argument(
        "--encode-batch", type=int, default=8,
        help="images per encode batch: the reference request and the activation reserve",
    )  # fmt: skip
    parser.add_argument(
        "--prefill-tokens", type=int, default=4096,
        help="prefill batch (tokens) the KV plan reserves activations for",
    )  # fmt: skip
    parser.add_argument("--output-tokens", type=int, default=256, help="tokens generated")
    parser.add_argument(
        "--mm-cache-tokens", type=int, default=8192, help="MM cache for the KV plan"
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV and MM block, tokens")
    parser.add_argument(
        "--max-forward-images", type=int, default=1024 if gpu else 8,
        help="largest encoder batch run for real; beyond, activations are extrapolated",
    )  # fmt: skip
    parser.add_argument(
        "--max-forward-tokens", type=int, default=32768 if gpu else 4096,
        help="longest prefill / decode context run for real; beyond, extrapolated",
    )  # fmt: skip
    parser.add_argument("--plot", help="bar chart PNG (default: beside --json)")
    parser.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Settings:
    """What the probe sizes things by (bytes, images, tokens)."""

    budget: float
    image_size: int
    encode_batch: int
    prefill_tokens: int
    output_tokens: int
    mm_cache_tokens: int
    block_size: int
    max_forward_images: int
    max_forward_tokens: int


@dataclass
class Result:
    """One quantity on one deployment: ``value`` in the quantity's unit, how it was found."""

    value: float
    pool: str
    method: str
    breakdown: dict[str, int] = field(default_factory=dict)
    ledgers: list[Ledger] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ooms(self) -> dict[str, Any]:
        """Out-of-memory errors caught while probing: all, raised by an allocator, and
        whether the host (not the budget) refused an allocation."""
        return {
            "caught": sum(lg.ooms for lg in self.ledgers),
            "real": sum(lg.real_ooms for lg in self.ledgers),
            "host_limited": any(lg.host_limited for lg in self.ledgers),
        }


def _stages(mode: str) -> dict[str, tuple[str, ...]]:
    from epdrt.planner.config import role_stages

    return role_stages(mode)


def _has_mm(stages: tuple[str, ...]) -> bool:
    return "encode" in stages or "prefill" in stages


def _has_kv(stages: tuple[str, ...]) -> bool:
    return "prefill" in stages or "decode" in stages


class Probe:
    """The model's two halves loaded once, activation curves, and the four measurements."""

    def __init__(self, model_dir: str, device: str, dtype: torch.dtype | None, s: Settings) -> None:
        from epdrt.models import load_adapter

        self.s = s
        self.device = torch.device(device)
        self.meter = Meter(self.device)
        _say(f"loading the vision tower of {model_dir} ...")
        self.enc = load_adapter(model_dir, self.device, dtype, stages=frozenset({"encode"}))
        _say("loading the language model ...")
        self.lm = load_adapter(
            model_dir, self.device, dtype, stages=frozenset({"prefill", "decode"})
        )
        self.spec = self.lm.spec
        self.dtype = self.lm.dtype
        self.weights = {"vision": module_bytes(self.enc.model), "lm": module_bytes(self.lm.model)}
        self.image = self.enc.preprocess_image(_test_image(s.image_size))
        self.tpi = self.image.num_tokens  # MM tokens per image
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.kv_bpt = self.spec.kv_bytes_per_token()
        self.mm_bpt = self.spec.hidden_size * itemsize
        cap_tokens = min(s.max_forward_tokens, self.spec.max_context)
        self.encode_act = Curve("encode", self._measure_encode, s.max_forward_images)
        self.prefill_act = Curve("prefill", self._measure_prefill, cap_tokens)
        self.decode_act = Curve("decode", self._measure_decode, cap_tokens)
        self._text_overhead = len(self.lm.tokenize("the").input_ids) - 1
        self._key = 0

    # ---- activation measurements (peak bytes over what was allocated before) ---------------
    def _guard(self, curve: Curve, x: int) -> None:
        if curve.points:
            self.meter.check_host(curve.fit(x))

    def _measure_encode(self, num_images: int) -> int:
        self._guard(self.encode_act, num_images)
        _say(f"  encode forward, {num_images} images ...")
        images = [self.image] * num_images
        return self.meter.peak_during(lambda: self.enc.encode(images))

    def _paged(self, tokens: int) -> Any:
        """A paged KV cache with room for ``tokens`` tokens (the measured forward's own)."""
        from epdrt.cache import PagedKVCache

        sp, bs = self.spec, self.s.block_size
        self.meter.check_host(tokens * self.kv_bpt)
        return PagedKVCache(
            sp.num_layers, sp.num_kv_heads, sp.head_dim, bs, -(-tokens // bs), self.dtype,
            self.device,
        )  # fmt: skip

    def _measure_prefill(self, num_tokens: int) -> int:
        """One prompt's flat prefill forward, its KV written into the pages."""
        from epdrt.models import FlatBatch

        self._guard(self.prefill_act, num_tokens)
        _say(f"  prefill forward, {num_tokens} tokens ...")
        words = max(num_tokens - self._text_overhead, 1)
        req = self.lm.tokenize(" ".join(["the"] * words))
        kv = self._paged(req.num_tokens)
        kv.extend(0, req.num_tokens)
        batch = FlatBatch.build(kv, [(0, req.num_tokens)])

        def run() -> Any:
            return self.lm.forward(self.lm.embed(req.input_ids), batch, [req.extras])

        return self.meter.peak_during(run)

    def _measure_decode(self, context: int) -> int:
        """One decode step the runtime's way: a flat forward of one token over the pages."""
        from epdrt.models import FlatBatch

        self._guard(self.decode_act, context)
        _say(f"  decode step, context {context} tokens ...")
        kv = self._paged(context + 1)
        kv.extend(0, context + 1)
        batch = FlatBatch.build(kv, [(0, 1)])
        extras = self.lm.decode_extras({})

        def run() -> Any:
            return self.lm.forward(self.lm.embed([0]), batch, [extras])

        return self.meter.peak_during(run)

    # ---- building blocks -------------------------------------------------------------------
    def new_ledger(self, mode: str, pool: str, budget: float) -> Ledger:
        """A ledger for one device of ``mode``, charged with the weights its stages load."""
        stages = _stages(mode)[pool]
        ledger = Ledger(f"{mode} {pool}", budget)
        # Set, not charged: weights over the budget leave no room, and every probe then fails.
        if "encode" in stages:
            ledger.held["vision weights"] = self.weights["vision"]
        if _has_kv(stages):
            ledger.held["LM weights"] = self.weights["lm"]
        return ledger

    def mm_cache(self, ledger: Ledger, what: str, tokens: int) -> Any:
        from epdrt.cache import MMTokenCache

        bs = self.s.block_size
        blocks = max(-(-tokens // bs), 1)
        return allocate(
            ledger, self.meter, what, blocks * bs * self.mm_bpt,
            lambda: MMTokenCache(self.spec.hidden_size, bs, blocks, self.dtype, self.device),
        )  # fmt: skip

    def kv_cache(self, ledger: Ledger, what: str, blocks: int) -> Any:
        from epdrt.cache import PagedKVCache

        sp, bs = self.spec, self.s.block_size
        return allocate(
            ledger, self.meter, what, max(blocks, 1) * bs * self.kv_bpt,
            lambda: PagedKVCache(
                sp.num_layers, sp.num_kv_heads, sp.head_dim, bs, max(blocks, 1), self.dtype,
                self.device,
            ),
        )  # fmt: skip

    def kv_blocks(self, tokens: int) -> int:
        return blocks_for(tokens, self.s.block_size)

    def activation(self, stages: tuple[str, ...], images: int, prompt: int, context: int) -> float:
        """Peak activations of a device whose stages take turns: the largest of its stages'."""
        acts = [0.0]
        if "encode" in stages:
            acts.append(self.encode_act(min(images, self.s.encode_batch)) if images else 0.0)
        if "prefill" in stages:
            acts.append(self.prefill_act(prompt))
        if "decode" in stages:
            acts.append(self.decode_act(context))
        return max(acts)

    def _fits(self, ledger: Ledger, allocate: Callable[[], object]) -> bool:
        """Runs ``allocate`` in a ledger scope; False (the OOM recorded) when memory ran out.

        What ``allocate`` returns is dropped at once: the probe keeps nothing it allocated.
        """
        with ledger.scope():
            try:
                allocate()
                return True
            except Exception as exc:
                if not is_oom(exc):
                    raise
                ledger.caught(exc)
                return False
            finally:
                self.meter.cleanup()

    def put_images(self, mm: Any, num_images: int) -> None:
        """Reserves ``num_images`` entries of ``tpi`` tokens (distinct keys) in ``mm``."""
        for _ in range(num_images):
            self._key += 1
            mm.reserve(self._key, self.tpi)

    def _done(self, held: list[Any]) -> None:
        held.clear()
        self.meter.cleanup(collect=True)

    # ---- 1. encoder-device peak memory -----------------------------------------------------
    def encoder_peak(self, mode: str) -> Result:
        pool = _encoder_pool(mode)
        stages = _stages(mode)[pool]
        n = self.s.encode_batch
        prompt = n * self.tpi + TEXT_TOKENS
        context = prompt + self.s.output_tokens
        ledger = self.new_ledger(mode, pool, math.inf)
        held: list[Any] = []
        notes: dict[str, Any] = {"images": n, "prompt_tokens": prompt}
        try:
            mm = self.mm_cache(ledger, "MM cache", n * self.tpi)
            held.append(mm)
            self.put_images(mm, n)
            if _has_kv(stages):
                tokens = context if "decode" in stages else prompt
                kv = self.kv_cache(ledger, "KV cache", self.kv_blocks(tokens))
                kv.extend(0, tokens)
                held.append(kv)
            act = self.activation(stages, n, prompt, context)
            if not math.isfinite(act):
                raise DeviceOutOfMemory("a stage forward ran out of memory")
            ledger.charge("activations", int(act))
        except Exception as exc:
            if not is_oom(exc):
                raise
            ledger.caught(exc)
            notes["incomplete"] = f"out of memory on the host: {exc}"
        self._done(held)
        notes["fits_budget"] = ledger.used <= self.s.budget and "incomplete" not in notes
        return Result(
            ledger.used / GiB, pool, self._method(stages, n, prompt, context), dict(ledger.held),
            [ledger], notes,
        )  # fmt: skip

    # ---- 2. largest encoder batch ----------------------------------------------------------
    def max_encoder_batch(self, mode: str) -> Result:
        pool = _encoder_pool(mode)
        stages = _stages(mode)[pool]
        ledger = self.new_ledger(mode, pool, self.s.budget)
        held: list[Any] = []

        def add(total: int, step: int) -> None:
            act = self.encode_act(total + step)
            before = ledger.held.get("activations", 0)
            ledger.charge("activations", _finite(act))
            try:
                held.append(self.mm_cache(ledger, f"MM chunk {len(held)}", step * self.tpi))
            except Exception:
                ledger.held["activations"] = before
                raise

        grown = self._grow(ledger, add)
        for i in range(len(held)):
            ledger.release(f"MM chunk {i}")
        ledger.release("activations")
        self._done(held)

        def encode_batch(b: int) -> None:
            ledger.charge("activations", _finite(self.encode_act(b)))
            self.put_images(self.mm_cache(ledger, "MM cache", b * self.tpi), b)

        def fits(b: int) -> bool:
            return self._fits(ledger, lambda: encode_batch(b))

        best = largest_fitting(fits, grown)
        breakdown = dict(ledger.held)
        if best:
            breakdown["MM cache"] = (
                self.kv_blocks(best * self.tpi) * self.s.block_size * (self.mm_bpt)
            )
            breakdown["activations"] = int(_finite(self.encode_act(best)))
        src = self.encode_act.source(best) if best else "measured"
        return Result(
            float(best), pool,
            f"weights: storage bytes of the loaded modules; MM cache: real MMTokenCache regions,"
            f" grown then one of the final size; activations: encoder forward peak, {src}"
            f" (real forwards up to {self.encode_act.max_measured} images, a line beyond)",
            breakdown, [ledger], {"activation_source": src, "stages": list(stages)},
        )  # fmt: skip

    # ---- 3. images per request --------------------------------------------------------------
    def max_images(self, mode: str) -> Result:
        pools = _stages(mode)
        ledgers = {p: self.new_ledger(mode, p, self.s.budget) for p in pools}
        held: dict[str, list[Any]] = {p: [] for p in pools}
        out = self.s.output_tokens

        def kv_tokens(stages: tuple[str, ...], n: int) -> int:
            if not _has_kv(stages) or n == 0:
                return 0
            return n * self.tpi + TEXT_TOKENS + (out if "decode" in stages else 0)

        def add(total: int, step: int) -> None:
            n = total + step
            prompt = n * self.tpi + TEXT_TOKENS
            saved = {p: dict(ledgers[p].held) for p in pools}
            kept = {p: len(held[p]) for p in pools}
            try:
                for p, stages in pools.items():
                    lg = ledgers[p]
                    act = self.activation(stages, n, prompt, prompt + out)
                    lg.charge("activations", _finite(act))
                    if _has_mm(stages):
                        held[p].append(self.mm_cache(lg, f"MM chunk {kept[p]}", step * self.tpi))
                    if _has_kv(stages):
                        new = kv_tokens(stages, n) - kv_tokens(stages, total)
                        blocks = self.kv_blocks(kv_tokens(stages, n)) - self.kv_blocks(
                            kv_tokens(stages, total)
                        )
                        if new > 0 and blocks > 0:
                            held[p].append(self.kv_cache(lg, f"KV chunk {kept[p]}", blocks))
            except Exception:
                for p in pools:
                    ledgers[p].held = saved[p]
                    del held[p][kept[p] :]
                raise

        grown = self._grow_many(ledgers, add)
        for p in pools:
            ledgers[p].held = {k: v for k, v in ledgers[p].held.items() if "chunk" not in k}
            ledgers[p].release("activations")
        for h in held.values():
            h.clear()
        self.meter.cleanup()

        def fits(n: int) -> bool:
            prompt = n * self.tpi + TEXT_TOKENS
            objs: list[Any] = []
            saved = {p: dict(ledgers[p].held) for p in pools}
            try:
                for p, stages in pools.items():
                    lg = ledgers[p]
                    lg.charge(
                        "activations", _finite(self.activation(stages, n, prompt, prompt + out))
                    )
                    if _has_mm(stages):
                        mm = self.mm_cache(lg, "MM cache", n * self.tpi)
                        self.put_images(mm, n)
                        objs.append(mm)
                    if _has_kv(stages):
                        tokens = kv_tokens(stages, n)
                        kv = self.kv_cache(lg, "KV cache", self.kv_blocks(tokens))
                        kv.extend(0, tokens)
                        objs.append(kv)
                return True
            except Exception as exc:
                if not is_oom(exc):
                    raise
                for lg in ledgers.values():
                    lg.caught(exc)
                return False
            finally:
                for p in pools:
                    ledgers[p].held = saved[p]
                objs.clear()
                self.meter.cleanup()

        best = largest_fitting(fits, grown)
        # Which device is fullest at `best + 1` images: the one that runs out first.
        limiting, breakdown = self._limit_at(pools, ledgers, best, kv_tokens)
        ctx_cap = max((self.spec.max_context - TEXT_TOKENS - out) // self.tpi, 0)
        prompt = best * self.tpi + TEXT_TOKENS
        srcs = {
            "prefill": self.prefill_act.source(prompt),
            "decode": self.decode_act.source(prompt + out),
        }
        return Result(
            float(best), limiting,
            "weights: storage bytes; MM and KV caches: real MMTokenCache / PagedKVCache regions for"
            " the request's tokens, grown then one of the final size per device; activations:"
            f" prefill {srcs['prefill']}, decode {srcs['decode']} (real forwards up to"
            f" {self.prefill_act.max_measured} tokens, a line beyond)",
            breakdown,
            list(ledgers.values()),
            {
                "limiting_device": limiting,
                "context_cap_images": ctx_cap,
                "binds_first": "context window" if ctx_cap < best else "memory",
                "prompt_tokens": prompt,
                "activation_source": srcs,
            },
        )  # fmt: skip

    def _limit_at(
        self,
        pools: dict[str, tuple[str, ...]],
        ledgers: dict[str, Ledger],
        n: int,
        kv_tokens: Callable[[tuple[str, ...], int], int],
    ) -> tuple[str, dict[str, int]]:
        """The device with the least room left for one more image, and its bytes at ``n``."""
        out = self.s.output_tokens
        worst, worst_room, worst_bd = "", math.inf, {}
        for p, stages in pools.items():
            m = n + 1
            prompt = m * self.tpi + TEXT_TOKENS
            need = ledgers[p].used + self.activation(stages, m, prompt, prompt + out)
            if _has_mm(stages):
                need += self.kv_blocks(m * self.tpi) * self.s.block_size * self.mm_bpt
            if _has_kv(stages):
                need += self.kv_blocks(kv_tokens(stages, m)) * self.s.block_size * self.kv_bpt
            room = self.s.budget - need
            if room < worst_room:
                prompt_n = n * self.tpi + TEXT_TOKENS
                bd = dict(ledgers[p].held)
                bd["activations"] = int(
                    _finite(self.activation(stages, n, prompt_n, prompt_n + out))
                )
                if _has_mm(stages):
                    bd["MM cache"] = self.kv_blocks(n * self.tpi) * self.s.block_size * self.mm_bpt
                if _has_kv(stages):
                    bd["KV cache"] = (
                        self.kv_blocks(kv_tokens(stages, n)) * self.s.block_size * self.kv_bpt
                    )
                worst, worst_room, worst_bd = p, room, bd
        return worst, worst_bd

    # ---- 4. KV capacity ---------------------------------------------------------------------
    def kv_capacity(self, mode: str, role: str) -> Result:
        pool = next(p for p, st in _stages(mode).items() if role in st)
        stages = _stages(mode)[pool]
        ledger = self.new_ledger(mode, pool, self.s.budget)
        held: list[Any] = []
        try:
            if _has_mm(stages):
                held.append(self.mm_cache(ledger, "MM cache", self.s.mm_cache_tokens))
            act = 0.0
            if "encode" in stages:
                act = self.encode_act(self.s.encode_batch)
            if "prefill" in stages:
                act = max(act, self.prefill_act(self.s.prefill_tokens))
            ledger.charge("activations", _finite(act))
        except Exception as exc:
            if not is_oom(exc):
                raise
            ledger.caught(exc)
            return Result(0.0, pool, "weights, MM cache and activations exceed the budget",
                          dict(ledger.held), [ledger])  # fmt: skip
        base = dict(ledger.held)
        chunks: list[Any] = []

        def add(total: int, step: int) -> None:
            chunks.append(self.kv_cache(ledger, f"KV chunk {len(chunks)}", step))

        grown = self._grow(ledger, add)
        chunks.clear()
        ledger.held = dict(base)
        self.meter.cleanup()

        def fits(blocks: int) -> bool:
            return self._fits(ledger, lambda: self.kv_cache(ledger, "KV cache", blocks))

        blocks = largest_fitting(fits, grown)
        held.clear()
        self.meter.cleanup()
        breakdown = dict(base)
        breakdown["KV cache"] = blocks * self.s.block_size * self.kv_bpt
        srcs = {}
        if "encode" in stages:
            srcs["encode"] = self.encode_act.source(self.s.encode_batch)
        if "prefill" in stages:
            srcs["prefill"] = self.prefill_act.source(self.s.prefill_tokens)
        return Result(
            float(blocks * self.s.block_size), pool,
            "weights: storage bytes; MM cache: a real MMTokenCache of --mm-cache-tokens; activation"
            " reserve: the largest of its stages' measured peaks (encode batch, prefill batch;"
            " decode steps not reserved, as in the planner); KV: real PagedKVCache regions grown"
            " to the limit, then one cache of the final size",
            breakdown, [ledger],
            {"kv_blocks": blocks, "activation_source": srcs, "stages": list(stages)},
        )  # fmt: skip

    # ---- helpers -----------------------------------------------------------------------------
    def _grow(self, ledger: Ledger, add: Callable[[int, int], None]) -> int:
        def counted(total: int, step: int) -> None:
            try:
                add(total, step)
            except Exception as exc:
                if is_oom(exc):
                    ledger.caught(exc)
                    self.meter.cleanup()
                raise

        return grow(counted)

    def _grow_many(self, ledgers: dict[str, Ledger], add: Callable[[int, int], None]) -> int:
        def counted(total: int, step: int) -> None:
            try:
                add(total, step)
            except Exception as exc:
                if is_oom(exc):
                    for lg in ledgers.values():
                        lg.caught(exc)
                    self.meter.cleanup()
                raise

        return grow(counted)

    def _method(self, stages: tuple[str, ...], n: int, prompt: int, context: int) -> str:
        parts = [f"encode {n} images: {self.encode_act.source(n)}"]
        if "prefill" in stages:
            parts.append(f"prefill {prompt} tokens: {self.prefill_act.source(prompt)}")
        if "decode" in stages:
            parts.append(f"decode at {context} tokens: {self.decode_act.source(context)}")
        return (
            "weights: storage bytes; caches: real MMTokenCache / PagedKVCache for the request;"
            " activations (peak of real forwards): " + ", ".join(parts)
        )

    def unit_costs(self) -> dict[str, float]:
        """Measured bytes per unit: encoder activations per image, prefill per token, decode
        per context token, KV and MM per token."""
        return {
            "encode_activation_bytes_per_image": self.encode_act.slope(),
            "prefill_activation_bytes_per_token": self.prefill_act.slope(),
            "decode_activation_bytes_per_context_token": self.decode_act.slope(),
            "kv_bytes_per_token": float(self.kv_bpt),
            "mm_bytes_per_token": float(self.mm_bpt),
        }


def _encoder_pool(mode: str) -> str:
    return next(p for p, st in _stages(mode).items() if "encode" in st)


def _finite(x: float) -> int:
    """``x`` as bytes to charge; an activation that ran out of memory charges "too much"."""
    return int(x) if math.isfinite(x) else 1 << 62


def _test_image(size: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


_START = time.monotonic()


def _say(msg: str) -> None:
    print(f"[capacity {time.monotonic() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- the planner's arithmetic, for comparison ---------------------------------------------
def _lmm_spec(config: Any, dtype: torch.dtype) -> Any:
    """The planner's ``LmmSpec`` of a Qwen2-VL or LLaVA config (None for other models)."""
    from epdrt.planner.estimate import LmmSpec

    t = config.get_text_config()
    v = config.vision_config
    heads = int(t.num_attention_heads)
    head_dim = int(getattr(t, "head_dim", None) or t.hidden_size // heads)
    common = dict(
        lm_layers=int(t.num_hidden_layers), lm_hidden=int(t.hidden_size),
        lm_intermediate=int(t.intermediate_size), lm_heads=heads,
        lm_kv_heads=int(getattr(t, "num_key_value_heads", None) or heads), lm_head_dim=head_dim,
        vocab=int(t.vocab_size),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
    )  # fmt: skip
    if config.model_type == "qwen2_vl":
        d, m = int(v.embed_dim), int(v.spatial_merge_size)
        merged = d * m * m
        return LmmSpec(
            name=f"qwen2-vl {t.hidden_size}", vit_layers=int(v.depth), vit_hidden=d,
            vit_intermediate=int(d * v.mlp_ratio), vit_patches_per_token=m * m,
            merger_params=merged * merged + merged * int(t.hidden_size), **common,
        )  # fmt: skip
    if config.model_type == "llava":
        d = int(v.hidden_size)
        return LmmSpec(
            name=f"llava {t.hidden_size}", vit_layers=int(v.num_hidden_layers), vit_hidden=d,
            vit_intermediate=int(v.intermediate_size), vit_patches_per_token=1,
            merger_params=d * int(t.hidden_size) + int(t.hidden_size) ** 2, **common,
        )  # fmt: skip
    return None


class Planner:
    """The planner's memory plan (``planner.config``) on a device of the budget's size, from
    the model's shapes (``planner.estimate``, a priori) and from the probe's measured unit
    costs."""

    def __init__(self, probe: Probe) -> None:
        from epdrt.planner.estimate import GpuSpec, estimate_profile
        from epdrt.planner.profile import MemoryProfile

        self.probe = probe
        s = probe.s
        budget = int(min(s.budget, 1 << 60))
        gpu = GpuSpec(
            name="budget", memory_bytes=budget, peak_flops=1e12, mfu=1.0, hbm_bytes_per_s=1e12,
            link_bytes_per_s=1e10, link_latency_s=0.0, encode_overhead_s=0.0,
            prefill_overhead_s=0.0, decode_overhead_s=0.0, runtime_overhead_bytes=0,
            usable_fraction=1.0,
        )  # fmt: skip
        lmm = _lmm_spec(probe.lm.config, probe.dtype)
        self.profiles: dict[str, Any] = {}
        if lmm is not None:
            self.profiles["estimate"] = estimate_profile(lmm, gpu)
            base = self.profiles["estimate"]
            costs = probe.unit_costs()
            measured = MemoryProfile(
                device_bytes=budget, usable_fraction=1.0, overhead_bytes=0,
                encode_weight_bytes=probe.weights["vision"], lm_weight_bytes=probe.weights["lm"],
                kv_bytes_per_token=costs["kv_bytes_per_token"],
                mm_bytes_per_token=costs["mm_bytes_per_token"],
                encode_activation_bytes_per_token=costs["encode_activation_bytes_per_image"]
                / probe.tpi,
                prefill_activation_bytes_per_token=costs["prefill_activation_bytes_per_token"],
            )  # fmt: skip
            self.profiles["estimate_measured_units"] = dataclasses.replace(base, memory=measured)

    def _config(self, mode: str, encode_batch: int, prefill_tokens: int) -> Any:
        from epdrt.planner.config import DeployConfig

        return DeployConfig(
            mode, 1, 1, 1, encode_batch=max(encode_batch, 1),
            prefill_tokens=max(prefill_tokens, 1),
        )  # fmt: skip

    def estimates(self, quantity: str, mode: str, pool: str) -> dict[str, float]:
        """The planner's value of ``quantity`` for ``pool`` of ``mode``, per profile."""
        return {name: self._estimate(p, quantity, mode, pool) for name, p in self.profiles.items()}

    def _estimate(self, profile: Any, quantity: str, mode: str, pool: str) -> float:
        from epdrt.planner.config import check_memory, gpu_memory

        s, t = self.probe.s, self.probe.tpi
        stages = _stages(mode)[pool]
        m = profile.memory
        if quantity == "encoder_peak_memory":
            n = s.encode_batch
            prompt = n * t + TEXT_TOKENS
            gm = gpu_memory(profile, stages, self._config(mode, n, prompt), t)
            kv = 0
            if _has_kv(stages):
                kv = prompt + (s.output_tokens if "decode" in stages else 0)
            total = gm.weight_bytes + gm.activation_bytes
            total += kv * m.kv_bytes_per_token + n * t * m.mm_bytes_per_token
            return total / GiB
        if quantity == "max_encoder_batch":
            cfg = self._config(mode, s.encode_batch, s.prefill_tokens)
            return float(gpu_memory(profile, stages, cfg, t).max_encode_batch)
        if quantity.startswith("kv_tokens"):
            cfg = self._config(mode, s.encode_batch, s.prefill_tokens)
            return float(gpu_memory(profile, stages, cfg, t).kv_tokens)
        if quantity == "max_images_per_request":

            def ok(n: int) -> bool:
                prompt = n * t + TEXT_TOKENS
                cfg = self._config(mode, min(n, s.encode_batch), prompt)
                return check_memory(profile, cfg, t, prompt + s.output_tokens, prompt) is None

            return float(largest_fitting(ok, _upper_bound(ok)))
        raise ValueError(quantity)


def _upper_bound(ok: Callable[[int], bool]) -> int:
    """A power of two past the largest ``n`` with ``ok(n)`` (monotone)."""
    n = 1
    while ok(n) and n < 1 << 30:
        n *= 2
    return n


# ---- records, table, chart -----------------------------------------------------------------
def _records(
    results: dict[str, dict[str, Result]], planner: Planner, setup: dict[str, Any]
) -> list[Record]:
    records = []
    for quantity, by_mode in results.items():
        label, unit, higher_better = QUANTITIES[quantity]
        for mode, base in COMPARISONS:
            if mode not in by_mode or base not in by_mode:
                continue
            r, b = by_mode[mode], by_mode[base]
            if higher_better:
                ratio = r.value / b.value if b.value > 0 else 0.0
            else:
                ratio = b.value / r.value if r.value > 0 else 0.0
            extra: dict[str, Any] = {
                "quantity": quantity,
                "deployment": mode,
                "device_role": r.pool,
                "baseline_deployment": base,
                "baseline_device_role": b.pool,
                "method": r.method,
                "breakdown_bytes": r.breakdown,
                "baseline_breakdown_bytes": b.breakdown,
                "estimate": planner.estimates(quantity, mode, r.pool),
                "baseline_estimate": planner.estimates(quantity, base, b.pool),
                "ooms": r.ooms,
                "baseline_ooms": b.ooms,
                **{k: v for k, v in r.notes.items()},
                "baseline_notes": b.notes,
                "setup": setup,
            }
            if ratio == 0.0 and (b.value == 0 or r.value == 0):
                extra["ratio_undefined"] = "a value is 0"
            records.append(
                Record(
                    bench="capacity",
                    case=f"{label}: {mode} {r.pool} vs {base} {b.pool}",
                    metric=unit,
                    value=float(r.value),
                    baseline=f"{base} ({b.pool} device), same model and budget",
                    baseline_value=float(b.value),
                    ratio=float(ratio),
                    extra=extra,
                )
            )
            if quantity in PER_GPU:
                # The same capacity spread over every GPU the deployment takes: a device of
                # its own for each stage is bought with GPUs the baseline does not use.
                gpus, base_gpus = DEPLOYMENT_GPUS[mode], DEPLOYMENT_GPUS[base]
                value, base_value = r.value / gpus, b.value / base_gpus
                records.append(
                    Record(
                        bench="capacity",
                        case=f"{label}, per GPU of the deployment: {mode} vs {base}",
                        metric=f"{unit} per GPU",
                        value=float(value),
                        baseline=f"{base} ({base_gpus} GPU), same model and budget",
                        baseline_value=float(base_value),
                        ratio=float(value / base_value) if base_value > 0 else 0.0,
                        extra={**extra, "gpus": gpus, "baseline_gpus": base_gpus},
                    )
                )
    return records


def _summary(results: dict[str, dict[str, Result]], planner: Planner, modes: list[str]) -> str:
    """Side by side: each quantity per deployment, measured / planner estimate."""
    rows = [["quantity", "unit", *modes, "epd/aggregated"]]
    for quantity, by_mode in results.items():
        label, unit, higher = QUANTITIES[quantity]
        cells = []
        for mode in modes:
            r = by_mode.get(mode)
            if r is None:
                cells.append("-")
                continue
            est = planner.estimates(quantity, mode, r.pool).get("estimate")
            est_s = f" (est {est:.4g})" if est is not None else ""
            cells.append(f"{r.value:.4g} [{r.pool}]{est_s}")
        ratio = "-"
        if "epd" in by_mode and "aggregated" in by_mode:
            e, a = by_mode["epd"].value, by_mode["aggregated"].value
            if e > 0 and a > 0:
                ratio = f"{(e / a if higher else a / e):.2f}x"
        rows.append([label, unit, *cells, ratio])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(
    results: dict[str, dict[str, Result]],
    planner: Planner,
    modes: list[str],
    path: str | Path,
    title: str,
) -> None:
    """Bars per deployment for each quantity (measured), the planner's estimate as markers,
    and the EPD/aggregated ratio above EPD's bar (higher is better)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results))
    colors = {"aggregated": "#8c8c8c", "pd": "#5b8fd1", "epd": "#e07b39"}
    for ax, (quantity, by_mode) in zip(axes, results.items()):
        label, unit, higher = QUANTITIES[quantity]
        shown = [m for m in modes if m in by_mode]
        xs = list(range(len(shown)))
        vals = [by_mode[m].value for m in shown]
        ax.bar(xs, vals, color=[colors.get(m, "#666") for m in shown])
        for name, marker in (("estimate", "x"), ("estimate_measured_units", "+")):
            est = [planner.estimates(quantity, m, by_mode[m].pool).get(name) for m in shown]
            if all(e is not None for e in est):
                lab = "planner, shapes" if name == "estimate" else "planner, measured units"
                ax.scatter(xs, est, marker=marker, color="black", zorder=3, label=lab)
        cap = by_mode[shown[0]].notes.get("context_cap_images")
        if quantity == "max_images_per_request" and cap is not None:
            ax.axhline(cap, color="black", ls="--", lw=1, label="context window")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(xs, [f"{m}\n{by_mode[m].pool}" for m in shown])
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(unit)
        if "epd" in by_mode and "aggregated" in by_mode:
            e, a = by_mode["epd"].value, by_mode["aggregated"].value
            if e > 0 and a > 0:
                r = e / a if higher else a / e
                i = shown.index("epd")
                ax.text(i, e / 2, f"{r:.2f}x", ha="center", va="center", fontsize=10,
                        color="white", fontweight="bold")  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))


# ---- entry point ------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[Record]:
    from epdrt.models import make_tiny_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: unknown {bad}; known: {list(MODES)}")
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = str(Path(tmp.name) / f"qwen2-vl-{args.size}")
        make_tiny_model(model_dir, "qwen2-vl", seed=args.seed, size=args.size)
    settings = Settings(
        budget=args.memory_budget * GiB,
        image_size=args.image_size,
        encode_batch=args.encode_batch,
        prefill_tokens=args.prefill_tokens,
        output_tokens=args.output_tokens,
        mm_cache_tokens=args.mm_cache_tokens,
        block_size=args.block_size,
        max_forward_images=args.max_forward_images,
        max_forward_tokens=args.max_forward_tokens,
    )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        probe = Probe(model_dir, args.device, dtype, settings)
        results = measure(probe, modes)
        planner = Planner(probe)
    finally:
        if tmp is not None:
            tmp.cleanup()
    setup = _setup(probe, args, model_dir)
    records = _records(results, planner, setup)
    print(_summary(results, planner, modes), file=sys.stderr)
    plot_path = args.plot or (
        str(Path(args.json).with_suffix(".png")) if args.json and args.json != "-" else None
    )
    if plot_path:
        title = (
            f"{setup['model']} ({setup['dtype']}), budget {args.memory_budget:g} GiB per device,"
            f" {probe.tpi} MM tokens/image, {setup['device']}"
        )
        plot(results, planner, modes, plot_path, title)
        _say(f"chart: {plot_path}")
    return records


def measure(probe: Probe, modes: list[str]) -> dict[str, dict[str, Result]]:
    """Every quantity for every mode in ``modes``."""
    s = probe.s
    _say("activation curves ...")
    for b in sorted(
        {1, 2, min(4, s.max_forward_images), min(s.encode_batch, s.max_forward_images)}
    ):
        probe.encode_act(b)
    prompt = s.encode_batch * probe.tpi + TEXT_TOKENS
    cap = probe.prefill_act.max_measured
    for n in sorted(
        {min(x, cap) for x in (max(s.prefill_tokens // 4, 1), s.prefill_tokens, prompt)}
    ):
        probe.prefill_act(n)
    for c in sorted({min(x, cap) for x in (max(prompt // 4, 1), prompt + s.output_tokens)}):
        probe.decode_act(c)
    results: dict[str, dict[str, Result]] = {q: {} for q in QUANTITIES}
    for mode in modes:
        _say(f"{mode}: encoder-device peak memory ...")
        results["encoder_peak_memory"][mode] = probe.encoder_peak(mode)
        _say(f"{mode}: largest encoder batch ...")
        results["max_encoder_batch"][mode] = probe.max_encoder_batch(mode)
        _say(f"{mode}: images per request ...")
        results["max_images_per_request"][mode] = probe.max_images(mode)
        _say(f"{mode}: KV capacity ...")
        results["kv_tokens_prefill"][mode] = probe.kv_capacity(mode, "prefill")
        results["kv_tokens_decode"][mode] = probe.kv_capacity(mode, "decode")
    return results


def _setup(probe: Probe, args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    s = probe.s
    name = args.size if args.model is None else Path(model_dir).name
    return {
        "model": f"{probe.spec.model_type} {name}",
        "weights": "random (config-only directory)" if args.model is None else "as in --model",
        "dtype": str(probe.dtype).removeprefix("torch."),
        "device": probe.meter.device.type,
        "budget_bytes": s.budget,
        "budget_gib": args.memory_budget,
        "budget_enforced_by": "ledger of really allocated bytes"
        + (" + CUDA OutOfMemoryError" if probe.meter.is_cuda else " (CPU host)"),
        "image_px": s.image_size,
        "mm_tokens_per_image": probe.tpi,
        "text_tokens": TEXT_TOKENS,
        "encode_batch": s.encode_batch,
        "prefill_tokens": s.prefill_tokens,
        "output_tokens": s.output_tokens,
        "mm_cache_tokens": s.mm_cache_tokens,
        "block_size": s.block_size,
        "max_context": probe.spec.max_context,
        "weight_bytes": dict(probe.weights),
        "unit_costs_measured": probe.unit_costs(),
        "activation_points_bytes": {
            "encode_images": {str(k): v for k, v in sorted(probe.encode_act.points.items())},
            "prefill_tokens": {str(k): v for k, v in sorted(probe.prefill_act.points.items())},
            "decode_context": {str(k): v for k, v in sorted(probe.decode_act.points.items())},
        },
        "activation_fit_max_relative_residual": {
            "encode": probe.encode_act.residual(),
            "prefill": probe.prefill_act.residual(),
            "decode": probe.decode_act.residual(),
        },
        "max_forward_images": s.max_forward_images,
        "max_forward_tokens": s.max_forward_tokens,
    }
