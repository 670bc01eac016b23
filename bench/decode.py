# SPDX-License-Identifier: Apache-2.0
"""Decode TPOT and prefill tokens/s of paged execution against ``model.generate()``.

For each batch size ``b`` and context ``c``: ``b`` random prompts of ``c`` tokens, then
``--steps`` greedy decode steps, run two ways in the same process on the same weights:

- **epdrt**: the prompts prefilled in one flat forward (chunks of ``--prefill-chunk`` tokens
  per sequence), then per step a slot for each sequence's new token, one flat forward over the
  paged KV cache and an argmax: a decode worker's work per step, without its messages.
  ``--backends`` adds the attention kernels' other backends as named peers (on a GPU: ``torch``
  beside Triton).
- **generate()**: ``model.generate(input_ids [b, c], do_sample=False)`` with exactly
  ``steps + 1`` new tokens; a logits processor stamps the time after every forward.

TPOT is the median time between consecutive decode steps (prefill excluded) for both; prefill
is the first forward (epdrt: its flat prefill; generate: from the call to its first stamp).
Each point runs ``--repeats`` times, the two sides alternating, and keeps each side's best
run: on a shared host, a slow spell then hits both sides instead of one.
Records: ``tpot_ms`` (ratio = generate / epdrt, above 1 means epdrt is faster) and
``prefill_tokens_per_s`` (ratio = epdrt / generate), one per backend and point.

Targets (issue "paged execution"): TPOT at most 1.0x of ``generate()`` at every point, at most
0.7x at 2k context and batch 8 or more.

Without ``--model`` a "small" LLaVA (hidden 256, 4 layers, random weights) is written to a
temporary directory. CPU runs use ``--threads`` torch threads (default 1).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from epdrt.benchmarking import Record
from epdrt.cache import sizing
from epdrt.models import FlatBatch, load_adapter, make_tiny_model

HELP = "decode TPOT and prefill tokens/s over the paged KV cache vs model.generate()"

BATCHES = (1, 8, 32)
CONTEXTS = (64, 512, 2048, 4096)
QUICK_BATCHES = (1, 4)
QUICK_CONTEXTS = (32, 160)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: small LLaVA)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (model's)")
    parser.add_argument("--batches", type=_ints, default=BATCHES, help="batch sizes, e.g. 1,8")
    parser.add_argument("--contexts", type=_ints, default=CONTEXTS, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per point")
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="prefill chunk tokens")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--backends", type=lambda t: tuple(t.split(",")), default=None,
        help="attention backends measured (default: auto, plus torch on CUDA)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per point")
    parser.add_argument("--quick", action="store_true", help=f"batches {QUICK_BATCHES},"
                        f" contexts {QUICK_CONTEXTS}, 4 steps, 1 repeat (a smoke run)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)


class _Stamps(LogitsProcessor):
    """Records ``perf_counter`` each time generate() has new logits (after every forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(adapter, prompts: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    """generate()'s prefill seconds and its decode step seconds."""
    stamps = _Stamps(adapter.device)
    _sync(adapter.device)
    start = time.perf_counter()
    with torch.inference_mode():
        adapter.model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
            min_new_tokens=steps + 1, max_new_tokens=steps + 1,
            logits_processor=LogitsProcessorList([stamps]), pad_token_id=0,
        )  # fmt: skip
    t = stamps.times
    return t[0] - start, [b - a for a, b in itertools.pairwise(t)]


def _epdrt(
    adapter, prompts: torch.Tensor, steps: int, backend: str, chunk: int, block_size: int
) -> tuple[float, list[float]]:
    """epdrt's prefill seconds and its decode step seconds, on a fresh paged cache."""
    b, c = prompts.shape
    kv = sizing.kv_cache(
        adapter.spec, b * (c + steps + 1 + block_size), block_size, adapter.dtype, adapter.device
    )
    extras = [adapter.decode_extras({})] * b  # text prompts: plain positions, also in prefill
    with torch.inference_mode():
        _sync(adapter.device)
        start = time.perf_counter()
        for s in range(b):
            kv.extend(s, c)
        last = None
        for first in range(0, c, chunk):
            n = min(chunk, c - first)
            batch = FlatBatch.build(kv, [(s, n, first) for s in range(b)], backend)
            embeds = adapter.embed(prompts[:, first : first + n].reshape(-1))
            last = adapter.forward(embeds, batch, extras)
        tokens = torch.argmax(last, dim=-1)
        tokens.tolist()
        prefill_s = time.perf_counter() - start
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for s in range(b):
                kv.extend(s, 1)
            batch = FlatBatch.build(kv, [(s, 1) for s in range(b)], backend)
            logits = adapter.forward(adapter.embed(tokens), batch, extras)
            tokens = torch.argmax(logits, dim=-1)
            tokens.tolist()  # the host needs the tokens every step, as a worker does
            times.append(time.perf_counter() - t0)
    return prefill_s, times


def _best(runs: list[tuple[float, list[float]]]) -> tuple[float, float]:
    """The fastest prefill and the lowest median step time (seconds) of repeated runs."""
    return min(p for p, _ in runs), min(statistics.median(steps) for _, steps in runs)


def run(args: argparse.Namespace) -> list[Record]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batches, contexts, steps, repeats = args.batches, args.contexts, args.steps, args.repeats
    if args.quick:
        batches, contexts, steps, repeats = QUICK_BATCHES, QUICK_CONTEXTS, 4, 1
    backends = args.backends or (("auto", "torch") if device.type == "cuda" else ("auto",))
    with tempfile.TemporaryDirectory(prefix="epdrt-decode-") as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = str(Path(tmp) / "small-llava")
            make_tiny_model(model_dir, "llava", size="small")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        adapter = load_adapter(model_dir, device=device, dtype=dtype)
    limit = adapter.spec.max_context
    gen = torch.Generator().manual_seed(args.seed)
    vocab = adapter.spec.vocab_size
    special = max(8, adapter.spec.image_token_id + 1)
    records: list[Record] = []
    for c in contexts:
        if c + steps + 1 > limit:
            print(f"skip context {c}: over the model's {limit} tokens", file=sys.stderr)
            continue
        for b in batches:
            prompts = torch.randint(special, vocab, (b, c), generator=gen).to(device)
            _generate(adapter, prompts[:, : min(c, 8)], 1)  # warm-up
            for backend in backends:
                _epdrt(adapter, prompts[:, : min(c, 8)], 1, backend, 8, args.block_size)
            g_runs, e_runs = [], {backend: [] for backend in backends}
            chunk = args.prefill_chunk
            for _ in range(max(1, repeats)):
                g_runs.append(_generate(adapter, prompts, steps))
                for backend in backends:
                    run = _epdrt(adapter, prompts, steps, backend, chunk, args.block_size)
                    e_runs[backend].append(run)
            g_prefill, g_tpot = _best(g_runs)
            for backend in backends:
                e_prefill, e_tpot = _best(e_runs[backend])
                name = "epdrt" if backend == "auto" else f"epdrt-{backend}"
                extra = {
                    "batch": b, "context": c, "steps": steps, "backend": backend,
                    "epdrt": name, "dtype": str(adapter.dtype).removeprefix("torch."),
                    "model": adapter.spec.model_type, "threads": torch.get_num_threads(),
                    "block_size": args.block_size, "repeats": repeats,
                }  # fmt: skip
                case = f"b{b}-ctx{c}" + ("" if backend == "auto" else f"-{backend}")
                records.append(Record(
                    "decode", case, "tpot_ms", e_tpot * 1e3, "generate()", g_tpot * 1e3,
                    g_tpot / e_tpot, extra=extra,
                ))  # fmt: skip
                tokens = b * c
                records.append(Record(
                    "decode", case, "prefill_tokens_per_s", tokens / e_prefill, "generate()",
                    tokens / g_prefill, g_prefill / e_prefill, extra=extra,
                ))  # fmt: skip
                print(
                    f"b={b} ctx={c} {name}: TPOT {e_tpot * 1e3:.2f} ms vs generate()"
                    f" {g_tpot * 1e3:.2f} ms ({e_tpot / g_tpot:.2f}x)",
                    file=sys.stderr,
                )
    return records
