# SPDX-License-Identifier: Apache-2.0
"""A ``StageRunner`` over a real model: each call does what a runtime worker does for one batch.

- encode: the vision tower on ``n`` distinct preprocessed images, outputs put in an
  ``MMTokenCache`` (as ``EncodeRole.step``);
- prefill: ``b`` requests of ``t`` text tokens each: embed and assemble the input embeddings,
  one flat LM forward writing their KV into a ``PagedKVCache``, each one's first token (as
  ``PrefillRole._prefill``);
- decode: one step of ``b`` sequences of ``c`` tokens each: a slot for each new token, one
  flat LM forward over the pages (as ``DecodeRole._decode_step``).

It also measures the runtime's fixed costs (``measure_overheads``: the router's preprocessing
and one control message between processes) and the block copy the runtime moves MM tokens
and KV with (``measure_block_copy``).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from epdrt.cache import PagedKVCache, sizing
from epdrt.errors import InvalidArgument
from epdrt.host_memory import keep_freed_host_memory
from epdrt.kernels import assemble_inputs_embeds
from epdrt.models import FlatBatch, ImageInput, PreparedRequest, load_adapter
from epdrt.planner.profile import Overheads, StageProfile, TransferProfile
from epdrt.planner.profiler import ProfileGrid, RunnerFacts, fit_transfer, measure_profile

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _png(rng: np.random.Generator, size: int) -> bytes:
    """A PNG of ``size`` x ``size`` random pixels (distinct content, distinct cache key)."""
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _param_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _submodule(root: torch.nn.Module, dotted: str) -> torch.nn.Module | None:
    mod: object = root
    for part in dotted.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod if isinstance(mod, torch.nn.Module) else None


def device_description(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"``-style name, or ``"cpu (N cores, 1 thread)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = os.cpu_count() or 1
    name = platform.processor() or platform.machine()
    return f"cpu {name} ({cores} cores, {torch.get_num_threads()} torch threads)"


class ModelStageRunner:
    """Runs single batches of a model's stages the way the runtime's workers do.

    Args:
        model_dir: a model directory (see ``epdrt.models``).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        dtype: weight, KV and image-token dtype (default: the model's).
        kv_cache_tokens: size of the paged KV cache the decode sweep uses (tokens); default:
            65,536 on CPU, on CUDA what 40% of the free memory after loading holds (at most
            2**20).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str = "cpu",
        dtype: str | None = None,
        *,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.adapter = load_adapter(
            str(model_dir),
            device=self.device,
            dtype=_DTYPES[dtype] if dtype else None,
            stages=frozenset({"encode", "prefill", "decode"}),
        )
        self.spec = self.adapter.spec
        self.dtype: torch.dtype = self.spec.dtype
        s = self.spec
        self.rng = np.random.default_rng(seed)
        self._keys = itertools.count(1)
        if kv_cache_tokens is None:
            kv_cache_tokens = 1 << 16
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_tokens = min(int(0.4 * free // s.kv_bytes_per_token()), 1 << 20)
        self.mm = sizing.mm_cache(s, 4096 * block_size, block_size, self.dtype, self.device)
        self.kv = sizing.kv_cache(s, kv_cache_tokens, block_size, self.dtype, self.device)
        self._images: dict[tuple[int, int], list[ImageInput]] = {}
        self._tpi: dict[int, int] = {}
        self._prompts: dict[int, PreparedRequest] = {}
        self._decode_shape: tuple[int, int] | None = None
        self._decode_extras: dict[str, torch.Tensor] = {}
        self._seq = itertools.count()

    # ---- facts -------------------------------------------------------------------------------
    def facts(self) -> RunnerFacts:
        s, a = self.spec, self.adapter
        enc = sum(_param_bytes(_submodule(a.model, p)) for p in a.encoder_parts)
        lm = sum(_param_bytes(_submodule(a.model, p)) for p in a.lm_parts)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            overhead = max(total - free - torch.cuda.memory_reserved(self.device), 0)
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            overhead = 0
        return RunnerFacts(
            device=device_description(self.device),
            device_bytes=int(total),
            encode_weight_bytes=int(enc),
            lm_weight_bytes=int(lm),
            kv_bytes_per_token=float(s.kv_bytes_per_token()),
            mm_bytes_per_token=float(s.hidden_size * itemsize),
            overhead_bytes=int(overhead),
        )

    # ---- encode ------------------------------------------------------------------------------
    def _image(self, size: int) -> ImageInput:
        return self.adapter.preprocess_image(self.adapter.load_image(_png(self.rng, size)))

    def tokens_per_image(self, image_size: int) -> int:
        if image_size not in self._tpi:
            self._tpi[image_size] = self._image(image_size).num_tokens
        return self._tpi[image_size]

    def encode(self, num_images: int, image_size: int) -> None:
        images = self._images.get((num_images, image_size))
        if images is None:
            images = [self._image(image_size) for _ in range(num_images)]
            self._images = {(num_images, image_size): images}  # keep one shape's images
        outputs = self.adapter.encode([im.tensors for im in images])
        for tokens in outputs:
            key = next(self._keys)
            self.mm.put(key, tokens.to(self.mm.dtype), hold=True)
            self.mm.release(key)

    # ---- prefill -----------------------------------------------------------------------------
    def _prompt(self, num_tokens: int) -> PreparedRequest:
        """A text-only request of exactly ``num_tokens`` tokens (the tokenizer's own ids)."""
        req = self._prompts.get(num_tokens)
        if req is not None:
            return req
        probe = self.adapter.tokenize("the")
        extra = len(probe.input_ids) - 1  # special tokens the tokenizer adds
        words = max(num_tokens - extra, 1)
        req = self.adapter.tokenize(" ".join(["the"] * words))
        if len(req.input_ids) != num_tokens:
            # Fall back to the ids of "the" repeated: same length, extras recomputed.
            ids = (req.input_ids * (num_tokens // len(req.input_ids) + 1))[:num_tokens]
            req = PreparedRequest(ids, [], [], self._text_extras(ids))
        self._prompts[num_tokens] = req
        return req

    def _text_extras(self, ids: list[int]) -> dict[str, torch.Tensor]:
        # NOTE: the adapters compute prefill extras (Qwen2-VL's M-RoPE positions) in tokenize;
        # a text-only prompt's are the plain positions, which _request_extras returns.
        return dict(self.adapter._request_extras(ids, []))

    def prefill(self, num_tokens: int, num_requests: int = 1) -> None:
        if num_tokens > self.spec.max_context:
            raise InvalidArgument(
                f"prefill of {num_tokens} tokens > context {self.spec.max_context}"
            )
        req = self._prompt(num_tokens)
        seqs = [("prefill", next(self._seq)) for _ in range(num_requests)]
        for seq in seqs:
            self.kv.extend(seq, num_tokens)
        try:
            ids = torch.tensor(req.input_ids * num_requests, dtype=torch.int64, device=self.device)
            embeds = assemble_inputs_embeds(self.adapter.embed(ids), self.mm, [])
            batch = FlatBatch.build(self.kv, [(seq, num_tokens) for seq in seqs])
            logits = self.adapter.forward(embeds, batch, [req.extras] * num_requests)
            torch.argmax(logits, dim=-1).tolist()
        finally:
            for seq in seqs:
                self.kv.free(seq)
        self._decode_extras = self.adapter.decode_extras(req.extras)

    # ---- decode ------------------------------------------------------------------------------
    def _setup_decode(self, batch_size: int, context_tokens: int) -> None:
        if self._decode_shape == (batch_size, context_tokens):
            return
        for seq in [s for s in self.kv.sequences() if s[0] == "decode"]:
            self.kv.free(seq)
        if not self._decode_extras:
            self.prefill(min(8, self.spec.max_context))
        s = self.spec
        kv = torch.randn(
            s.num_layers, 2, context_tokens, s.num_kv_heads, s.head_dim, device=self.device
        ).to(self.dtype)
        for i in range(batch_size):
            seq = ("decode", i)
            slots = self.kv.reserve(seq, context_tokens)
            for layer in range(s.num_layers):
                self.kv.write(layer, slots, kv[layer, 0], kv[layer, 1])
        self._decode_shape = (batch_size, context_tokens)

    def decode(self, batch_size: int, context_tokens: int) -> None:
        self._setup_decode(batch_size, context_tokens)
        seqs = [("decode", i) for i in range(batch_size)]
        for seq in seqs:
            self.kv.extend(seq, 1)
        batch = FlatBatch.build(self.kv, [(seq, 1) for seq in seqs])
        ids = torch.full((batch_size,), 5, dtype=torch.int64, device=self.device)
        logits = self.adapter.forward(
            self.adapter.embed(ids), batch, [self._decode_extras] * batch_size
        )
        torch.argmax(logits, dim=-1).tolist()

    # ---- device ------------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int:
        """CUDA: peak bytes allocated by torch. CPU: 0 (no resettable peak on the host)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return 0

    # ---- runtime costs -----------------------------------------------------------------------
    def prepare_seconds(self, num_images: int, image_size: int, repeats: int = 5) -> float:
        """Median seconds of the router's preprocessing of one request with ``num_images``
        PNG images: decode, the image processor, tokenization (as ``Preprocessor.prepare``)."""
        pngs = [_png(self.rng, image_size) for _ in range(num_images)]
        prompt = " ".join([self.spec.image_placeholder] * num_images + ["describe", "it"])
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            images = [self.adapter.preprocess_image(self.adapter.load_image(p)) for p in pngs]
            self.adapter.tokenize(prompt, images)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


def default_grid(runner: ModelStageRunner, quick: bool = False) -> ProfileGrid:
    """Batch shapes sized to the model and device: prompts within the model's context, decode
    batches whose KV fits the runner's cache, image sizes the image processor distinguishes."""
    s = runner.spec
    on_gpu = runner.device.type == "cuda"
    ctx = s.max_context
    if on_gpu and not quick:
        pre = (128, 512, 1024, 2048, 4096, 8192)
        dec_b, dec_c = (1, 8, 32, 64, 128), (256, 1024, 4096)
        enc_n = (1, 2, 4, 8, 16)
        repeats, warmup = 5, 2
        batch_tokens = 32768
    else:
        pre = (16, 64, 128, 256, 512, 1024)
        dec_b, dec_c = (1, 2, 4, 8, 16, 32), (32, 128, 384)
        enc_n = (1, 2, 4, 8)
        repeats, warmup = (3, 1) if quick else (5, 2)
        batch_tokens = 4096  # the runtime's default prefill budget
    # Fast shapes are run until their runs add up to min_seconds (up to max_repeats runs):
    # a 3 ms CPU decode step's median of 5 moved by 30% from one profile to the next.
    min_seconds, max_repeats = (0.0, 0) if quick else ((0.1, 20) if on_gpu else (0.25, 25))
    near = max(ctx - 16, 1)  # the longest prompt measured: just inside the context
    pre = tuple(sorted({t for t in pre if t <= near} | ({near} if max(pre) > near else set())))
    grid = ProfileGrid(
        encode_images=enc_n,
        image_sizes=image_sizes(runner, quick),
        prefill_tokens=pre,
        prefill_batch=(4, 16),
        max_prefill_batch_tokens=batch_tokens,
        decode_batch=dec_b,
        decode_context=dec_c,
        warmup=warmup,
        repeats=repeats,
        min_seconds=min_seconds,
        max_repeats=max_repeats,
        # Room for the sequences' tokens and the partly filled last block of each.
        max_decode_tokens=(runner.kv.num_blocks - max(dec_b)) * runner.kv.block_size,
    )
    growth = grid.decode_growth
    fitting = tuple(c for c in dec_c if c + growth <= ctx) or (max(ctx // 2, 1),)
    return replace(grid, decode_context=fitting)


def image_sizes(runner: ModelStageRunner, quick: bool = False) -> tuple[int, ...]:
    """Square image sizes (pixels) giving distinct token counts: one for a fixed-resolution
    encoder (LLaVA), a few across the processor's pixel range for Qwen2-VL."""
    proc = runner.adapter.image_processor
    size = getattr(proc, "size", None) or {}
    get = size.get if hasattr(size, "get") else lambda k: getattr(size, k, None)
    lo, hi = get("shortest_edge"), get("longest_edge")
    if runner.spec.model_type == "qwen2_vl" and lo and hi:
        # Qwen2-VL: the edges are pixel counts (min_pixels, max_pixels); a few sides in range.
        side_lo = max(math.isqrt(int(lo)), 28)
        side_hi = math.isqrt(int(hi))
        if runner.device.type == "cuda" and not quick:
            side_hi = min(side_hi, 896)
        sides = np.linspace(side_lo, side_hi, 2 if quick else 3)
        out = sorted({max(28, round(float(v) / 28) * 28) for v in sides})
    else:
        crop = getattr(proc, "crop_size", None) or {}
        cget = crop.get if hasattr(crop, "get") else lambda k: getattr(crop, k, None)
        out = [int(cget("height") or lo or 224)]
    seen: dict[int, int] = {}
    for side in out:
        seen.setdefault(runner.tokens_per_image(side), side)
    return tuple(sorted(seen.values()))


# ---- the runtime's fixed costs -----------------------------------------------------------------


_ECHO = """
import os, sys, zmq
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL); pull.bind(sys.argv[1])
push = ctx.socket(zmq.PUSH); push.connect(sys.argv[2])
parent = os.getppid()
while True:
    if not pull.poll(200):
        if os.getppid() != parent:
            break
        continue
    frames = pull.recv_multipart()
    if frames == [b"stop"]:
        break
    push.send_multipart(frames)
"""


def measure_message_seconds(
    repeats: int = 100, idle_s: float = 0.02, timeout_s: float = 60.0
) -> tuple[float, float]:
    """One-way latency of a small control message between two processes over the runtime's
    channel (ZeroMQ ipc, msgspec), as half the median round trip to an echoing child process.

    Returns:
        (to a process that is busy polling: back-to-back round trips, to a process that has
        waited ``idle_s`` in poll: one round trip after each such pause). The runtime's
        workers wait in poll between batches, so most of its messages meet the second case.
    """
    import zmq

    from epdrt.runtime import messages as m
    from epdrt.runtime.channel import Channel

    with tempfile.TemporaryDirectory(prefix="epdrt-profile-") as tmp:
        mine, theirs = f"ipc://{tmp}/parent.sock", f"ipc://{tmp}/echo.sock"
        ch = Channel(mine)
        proc = subprocess.Popen(
            [sys.executable, "-c", _ECHO, theirs, mine], stdin=subprocess.DEVNULL
        )
        try:
            ch.connect("echo", theirs)
            ping = m.Abort("profile-ping")
            deadline = time.monotonic() + timeout_s
            got = None
            while got is None:  # the child may still be starting
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the echo process did not answer")
                ch.send("echo", ping)
                got = ch.recv(0.2)
            while ch.recv(0.05) is not None:  # drain duplicate answers
                pass

            def rtt() -> float:
                t0 = time.perf_counter()
                ch.send("echo", ping)
                if ch.recv(5.0) is None:
                    raise RuntimeError("the echo process stopped answering")
                return time.perf_counter() - t0

            busy = [rtt() for _ in range(repeats + 10)][10:]
            idle = []
            for _ in range(max(repeats // 4, 10)):
                time.sleep(idle_s)
                idle.append(rtt())
            stop = zmq.Context.instance().socket(zmq.PUSH)
            stop.setsockopt(zmq.LINGER, 1000)
            stop.connect(theirs)
            stop.send(b"stop")
            stop.close()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            ch.close()
    return statistics.median(busy) / 2, statistics.median(idle) / 2


def fit_wake(gaps_s: list[float], extra_s: list[float]) -> tuple[float, float]:
    """Least-squares ``extra = wake * (1 - exp(-gap / tau))`` over a grid of tau (seconds);
    returns (wake, tau), wake >= 0."""
    g, y = np.asarray(gaps_s, dtype=float), np.asarray(extra_s, dtype=float)
    best = (math.inf, 0.0, 0.0)
    for tau in np.geomspace(2e-4, 1.0, 80):
        f = -np.expm1(-g / tau)
        wake = max(float(f @ y) / float(f @ f), 0.0)
        sse = float(((wake * f - y) ** 2).sum())
        if sse < best[0]:
            best = (sse, wake, float(tau))
    return best[1], best[2]


def measure_wake(
    runner: ModelStageRunner,
    image_size: int,
    gaps_s: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
    repeats: int = 5,
) -> tuple[list[float], list[float]]:
    """Extra seconds of a small encode, prefill and decode batch started after idling each
    gap, over the same batch run back to back (mean over the three)."""
    ops: list[Callable[[], None]] = [
        lambda: runner.encode(1, image_size),
        lambda: runner.prefill(min(64, runner.spec.max_context // 2)),
        lambda: runner.decode(1, min(64, runner.spec.max_context // 2)),
    ]
    extra = np.zeros(len(gaps_s))
    for op in ops:
        op()
        warm = []
        for _ in range(repeats):
            runner.synchronize()
            t0 = time.perf_counter()
            op()
            runner.synchronize()
            warm.append(time.perf_counter() - t0)
        base = statistics.median(warm)
        for i, gap in enumerate(gaps_s):
            op()
            times = []
            for _ in range(repeats):
                runner.synchronize()
                time.sleep(gap)
                t0 = time.perf_counter()
                op()
                runner.synchronize()
                times.append(time.perf_counter() - t0)
            extra[i] += (statistics.median(times) - base) / len(ops)
    return list(gaps_s), extra.tolist()


def measure_overheads(
    runner: ModelStageRunner,
    image_size: int,
    images: tuple[int, ...] = (0, 1, 2, 4),
    progress: Callable[[str], None] | None = None,
) -> tuple[Overheads, dict[str, list[float]]]:
    """The router's preprocessing (fitted ``a + b * images``, back to back), one control
    message (warm) and the wake-up cost after idling; also returns the raw samples."""
    xs, ys = [], []
    for n in images:
        xs.append(n)
        ys.append(runner.prepare_seconds(n, image_size))
    a = np.column_stack([np.ones(len(xs)), np.asarray(xs, dtype=float)])
    fixed, per_image = np.linalg.lstsq(a, np.asarray(ys), rcond=None)[0]
    msg_busy, msg = measure_message_seconds()
    gaps, extra = measure_wake(runner, image_size)
    wake, tau = fit_wake(gaps, extra)
    if progress:
        progress(
            f"runtime overheads: prepare {fixed * 1e3:.2f} ms + {per_image * 1e3:.2f} ms/image, "
            f"message {msg * 1e6:.0f} us ({msg_busy * 1e6:.0f} us back to back), "
            f"wake-up {wake * 1e3:.2f} ms (tau {tau * 1e3:.0f} ms)"
        )
    samples = {
        "prepare": [list(p) for p in zip(xs, ys)],
        "wake": [list(p) for p in zip(gaps, extra)],
        "message_busy_s": [msg_busy],
        "message_idle_s": [msg],
    }
    over = Overheads(max(float(fixed), 0.0), max(float(per_image), 0.0), msg, wake, tau)
    return over, samples


def measure_block_copy(runner: ModelStageRunner, repeats: int = 20) -> TransferProfile:
    """Seconds of the runtime's cache-to-cache copy (``index_copy_`` of whole KV blocks from
    one region into another, as prefill hands KV to decode) against bytes, fitted
    ``latency + bytes / bandwidth``."""
    s = runner.spec
    src = runner.kv
    dst = PagedKVCache(
        s.num_layers, s.num_kv_heads, s.head_dim, src.block_size, src.num_blocks, runner.dtype,
        runner.device,
    )  # fmt: skip
    sizes, secs = [], []
    most = max(min(src.num_blocks // 2, 1024), 2)
    counts = sorted({1, 4, 16, 64, 256, most} & set(range(1, most + 1)))
    perm = torch.randperm(src.num_blocks)
    for n in counts:
        src_blocks = perm[:n].to(runner.device)
        dst_blocks = perm[n : 2 * n].to(runner.device) if 2 * n <= src.num_blocks else src_blocks
        times = []
        for _ in range(repeats + 2):
            runner.synchronize()
            t0 = time.perf_counter()
            dst.storage.index_copy_(0, dst_blocks, src.storage.index_select(0, src_blocks))
            runner.synchronize()
            times.append(time.perf_counter() - t0)
        sizes.append(float(n * src.block_nbytes))
        secs.append(statistics.median(times[2:]))
    return fit_transfer(sizes, secs)


def profile_model(
    model_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str | None = None,
    name: str | None = None,
    quick: bool = False,
    transfer: TransferProfile | None = None,
    transfer_note: str = "",
    overheads: bool = True,
    progress: Callable[[str], None] | None = None,
) -> StageProfile:
    """Measures a model directory's stage profile on ``device`` (see ``epdrt profile``).

    Args:
        transfer: the link's cost (from the transfer benchmark's records); default: the
            runtime's block copy in this process (``epdrt.bench.transfer.quick_ipc_link``
            measures the link between two processes; the CLI passes it).
        overheads: also measure the runtime's fixed costs (router preprocessing, a control
            message between processes, the wake-up cost after idling).

    On the CPU this process's allocator is set as in the runtime's CPU workers
    (``host_memory.keep_freed_host_memory``), so the profile measures what they run.
    """
    if torch.device(device).type == "cpu":
        keep_freed_host_memory()
    runner = ModelStageRunner(model_dir, device, dtype)
    grid = default_grid(runner, quick)
    if progress:
        progress(
            f"loaded {runner.spec.model_type} on {device}: {len(grid.image_sizes)} image sizes, "
            f"{len(grid.prefill_tokens)} prompt lengths, {len(grid.decode_batch)} x "
            f"{len(grid.decode_context)} decode shapes, median of {grid.repeats}"
        )
    notes = []
    if transfer is None:
        transfer = measure_block_copy(runner)
        note = "the runtime's cache-to-cache block copy in one process (index_copy_), run here"
        notes.append(f"transfer: {note}")
        if progress:
            progress(
                f"transfer: {transfer.latency_s * 1e6:.0f} us + "
                f"{transfer.bytes_per_s / 1e9:.2f} GB/s ({note})"
            )
    elif transfer_note:
        notes.append(f"transfer: {transfer_note}")
    over, over_samples = (Overheads(), {})
    if overheads:
        over, over_samples = measure_overheads(runner, grid.image_sizes[0], progress=progress)
        notes.append(
            "overheads: router preprocessing of PNG images, a ZeroMQ control message to a "
            "child process, and the wake-up cost of a small batch after idling, measured here"
        )
    model = Path(model_dir).name or str(model_dir)
    profile = measure_profile(
        runner,
        transfer,
        name=name or f"{model} on {device}",
        grid=grid,
        progress=progress,
        overheads=over,
        notes="; ".join(notes),
    )
    samples = dict(profile.samples)
    if over_samples:
        samples["overheads"] = over_samples
    samples["grid"] = {
        "encode_images": list(grid.encode_images),
        "image_sizes": list(grid.image_sizes),
        "prefill_tokens": list(grid.prefill_tokens),
        "decode_batch": list(grid.decode_batch),
        "decode_context": list(grid.decode_context),
        "warmup": grid.warmup,
        "repeats": grid.repeats,
        "min_seconds": grid.min_seconds,
        "max_repeats": grid.max_repeats,
        "max_decode_tokens": grid.max_decode_tokens,
    }
    return replace(profile, samples=samples)
