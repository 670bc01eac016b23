# SPDX-License-Identifier: Apache-2.0
"""Bandwidth of the data-movement kernels against ``torch.Tensor.copy_`` and naive peers.

For each kernel (kv_scatter, kv_gather, mm_embed, block_copy), block size and block count:
bytes moved, median time and GB/s of the kernel, of ``copy_`` between two contiguous buffers of
the same number of bytes (the practical limit), of a Python loop of per-block ``copy_`` and of
``index_select``/``index_copy_``, all in the same run. One record per peer; a wide table on
stderr; a PNG plot with ``--plot`` (default: beside ``--json``).

Bytes moved = payload bytes, each counted once (a copy of N bytes moves N bytes, as ``copy_``):
KV kernels ``2 * tokens * H * D * itemsize`` (K and V), mm_embed every output row, block_copy
``pairs * block_bytes``. Index and slot reads are not counted.

GPU timing: CUDA events around one call after a 256 MiB L2 flush, median of ``--reps``; the
flush also hides the Python launch cost up to its own ~0.1 ms, so small cases show device time.
CPU timing: ``perf_counter``, median; buffers are pre-faulted (touched once before timing). On
CPU the kernels run as the torch reference (``torch-ref``) and host memcpy threads (``host``):
Triton's interpreter is not a performance path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from epdrt.benchmarking import Record
from epdrt.kernels import BlockCopy, kv_gather, kv_scatter, mm_embed, mm_source_rows

HELP = "GB/s of kv_scatter/kv_gather/mm_embed/block_copy vs copy_ and naive peers"

KERNELS = ("kv_scatter", "kv_gather", "mm_embed", "block_copy")
GPU_BLOCK_SIZES = [16, 32, 64, 128]
GPU_BLOCKS = [1, 4, 16, 64, 256, 1024, 4096]
CPU_BLOCK_SIZES = [16, 64]
CPU_BLOCKS = [1, 16, 256]
FLUSH_BYTES = 256 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEERS = {
    "copy": "torch copy_ of the same bytes",
    "loop": "Python loop of per-block copy_",
    "index": "index_select/index_copy_",
}
TIME_BUDGET_S = 0.5  # per measurement, beyond the first run


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset")
    parser.add_argument(
        "--block-sizes", type=_ints, default=None,
        help=f"tokens per block (default GPU {GPU_BLOCK_SIZES}, CPU {CPU_BLOCK_SIZES})",
    )  # fmt: skip
    parser.add_argument(
        "--blocks", type=_ints, default=None,
        help=f"blocks per call (default GPU {GPU_BLOCKS}, CPU {CPU_BLOCKS})",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the small CPU grid on any device")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2, help="cache layers (strided layer view)")
    parser.add_argument("--hidden", type=int, default=4096, help="mm_embed hidden size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (GPU 50, CPU 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU: torch intra-op threads and host block_copy threads (same for both)",
    )  # fmt: skip
    parser.add_argument("--plot", default=None, help="PNG path (default: beside --json)")


# ---- timing -----------------------------------------------------------------------------------
class Timer:
    """Median seconds of a callable: CUDA events after an L2 flush, or perf_counter on CPU."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.cuda = device.type == "cuda"
        self._flush = None
        if self.cuda:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    def _once(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        assert self._flush is not None
        self._flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def __call__(self, fn: Callable[[], Any]) -> float:
        self._once(fn)  # warm-up: compiles, allocator, caches of the host path
        first = self._once(fn)
        reps = max(3, min(self.reps, int(TIME_BUDGET_S / max(first, 1e-6))))
        return statistics.median([first] + [self._once(fn) for _ in range(reps - 1)])


# ---- cases ------------------------------------------------------------------------------------
class Rng:
    """Seeded random data made on the device (no host-side generation of GiB tensors) and
    permutations made on the host."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.host = torch.Generator().manual_seed(seed)
        self.device = device
        self.dev = torch.Generator(device=device).manual_seed(seed)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.host)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=self.dev, device=self.device, dtype=dtype)

    def bytes(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=self.dev, device=self.device,
                             dtype=torch.uint8)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """What one case measures: a kernel and implementation at one block size and count."""

    kernel: str
    impl: str
    block_size: int
    num_blocks: int
    block_bytes: int
    nbytes: int  # payload bytes moved per call


@dataclass
class Case:
    """Callables over the same bytes: the kernel, each peer, and a correctness check."""

    shape: Shape
    run: Callable[[], Any]
    peers: dict[str, Callable[[], Any]]
    check: Callable[[], bool]


Row = tuple[Shape, float, dict[str, float]]


def _copy_peer(nbytes: int, device: torch.device) -> Callable[[], Any]:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    return lambda: dst.copy_(src)


def _kv_cases(args: argparse.Namespace, device: torch.device, bs: int, counts: list[int],
              dtype: torch.dtype, rng: Rng) -> Iterator[Case]:  # fmt: skip
    heads, dim, layers = args.kv_heads, args.head_dim, args.layers
    num_blocks = max(counts) + 1
    storage = torch.zeros((num_blocks, layers, 2, bs, heads, dim), dtype=dtype, device=device)
    layer = storage[:, layers - 1]  # strided: block stride = layers * 2 * bs * H * D
    impl = "triton" if device.type == "cuda" else "torch-ref"
    itemsize = storage.element_size()
    block_bytes = 2 * bs * heads * dim * itemsize  # K and V of one layer of one block
    for n in counts:
        blocks = rng.perm(num_blocks)[:n]
        blocks_dev = blocks.to(device)
        block_list = blocks.tolist()
        tokens = n * bs
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten().to(device)
        key = rng.randn((tokens, heads, dim), dtype)
        value = rng.randn((tokens, heads, dim), dtype)
        nbytes = 2 * key.numel() * itemsize
        k_pages, v_pages = key.view(n, bs, heads, dim), value.view(n, bs, heads, dim)

        def scatter(key=key, value=value, slots=slots):
            kv_scatter(key, value, layer, slots, check_indices=False)

        def scatter_loop(kp=k_pages, vp=v_pages, bl=block_list):
            for i, b in enumerate(bl):
                layer[b, 0].copy_(kp[i])
                layer[b, 1].copy_(vp[i])

        def scatter_index(kp=k_pages, vp=v_pages, b=blocks_dev):
            layer[:, 0].index_copy_(0, b, kp)
            layer[:, 1].index_copy_(0, b, vp)

        def scatter_check(kp=k_pages, vp=v_pages, b=blocks_dev, scatter=scatter):
            scatter()
            return torch.equal(layer[b, 0], kp) and torch.equal(layer[b, 1], vp)

        yield Case(Shape("kv_scatter", impl, bs, n, block_bytes, nbytes), scatter,
                          {"copy": _copy_peer(nbytes, device), "loop": scatter_loop,
                           "index": scatter_index}, scatter_check)  # fmt: skip

        # Gather the same blocks as sequences of up to 16 blocks (a batch being staged).
        per_seq = min(n, 16)
        tables = blocks_dev.view(-1, per_seq)
        lens = [per_seq * bs] * tables.shape[0]
        out = (torch.empty_like(key), torch.empty_like(value))
        out_pages = (out[0].view(n, bs, heads, dim), out[1].view(n, bs, heads, dim))

        def gather(tables=tables, lens=lens, out=out):
            kv_gather(layer, tables, lens, out=out, check_indices=False)

        def gather_loop(op=out_pages, bl=block_list):
            for i, b in enumerate(bl):
                op[0][i].copy_(layer[b, 0])
                op[1][i].copy_(layer[b, 1])

        def gather_index(op=out_pages, b=blocks_dev):
            torch.index_select(layer[:, 0], 0, b, out=op[0])
            torch.index_select(layer[:, 1], 0, b, out=op[1])

        def gather_check(op=out_pages, b=blocks_dev, gather=gather):
            gather()
            return torch.equal(op[0], layer[b, 0]) and torch.equal(op[1], layer[b, 1])

        yield Case(Shape("kv_gather", impl, bs, n, block_bytes, nbytes), gather,
                          {"copy": _copy_peer(nbytes, device), "loop": gather_loop,
                           "index": gather_index}, gather_check)  # fmt: skip


def _mm_cases(args: argparse.Namespace, device: torch.device, bs: int, counts: list[int],
              dtype: torch.dtype, rng: Rng) -> Iterator[Case]:  # fmt: skip
    hidden, text_gap = args.hidden, 32
    num_blocks = max(counts) + 1
    pages = rng.randn((num_blocks, bs, hidden), dtype)
    impl = "triton" if device.type == "cuda" else "torch-ref"
    itemsize = pages.element_size()
    flat_pages = pages.view(-1, hidden)
    for n in counts:
        # Images of up to 16 full blocks, each after text_gap text tokens.
        blocks = rng.perm(num_blocks)[:n].tolist()
        per_image = min(n, 16)
        placements, copies, row = [], [], 0
        for i in range(0, n, per_image):
            row += text_gap
            image = blocks[i : i + per_image]
            placements.append((row, image, per_image * bs))
            copies += [(row + j * bs, b) for j, b in enumerate(image)]
            row += per_image * bs
        text = rng.randn((row, hidden), dtype)
        out = torch.empty_like(text)
        src_rows = mm_source_rows(row, placements, bs, device=device)
        mm = torch.nonzero(src_rows >= 0).flatten()
        mm_src = src_rows[mm]
        nbytes = text.numel() * itemsize

        def assemble(text=text, src_rows=src_rows, out=out):
            mm_embed(text, pages, src_rows, out=out, check_indices=False)

        def assemble_loop(text=text, out=out, copies=copies):
            out.copy_(text)
            for r, b in copies:
                out[r : r + bs].copy_(pages[b])

        def assemble_index(text=text, out=out, mm=mm, mm_src=mm_src):
            out.copy_(text)
            out.index_copy_(0, mm, flat_pages.index_select(0, mm_src))

        def assemble_check(text=text, out=out, mm=mm, mm_src=mm_src, assemble=assemble):
            assemble()
            expected = text.clone()
            expected[mm] = flat_pages[mm_src]
            return torch.equal(out, expected)

        yield Case(Shape("mm_embed", impl, bs, n, bs * hidden * itemsize, nbytes), assemble,
                          {"copy": _copy_peer(nbytes, device), "loop": assemble_loop,
                           "index": assemble_index}, assemble_check)  # fmt: skip


def _copy_cases(args: argparse.Namespace, device: torch.device, bs: int, counts: list[int],
                dtype: torch.dtype, rng: Rng) -> Iterator[Case]:  # fmt: skip
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = 2 * bs * args.kv_heads * args.head_dim * itemsize  # one layer of a KV block
    num_blocks = max(counts) + 1
    src = rng.bytes((num_blocks, block_bytes))
    dst = torch.zeros((num_blocks, block_bytes), dtype=torch.uint8, device=device)
    impls = ["cuda", "triton"] if device.type == "cuda" else ["host"]
    for n in counts:
        pairs = torch.stack([rng.perm(num_blocks)[:n], rng.perm(num_blocks)[:n]], 1)
        pair_list = pairs.tolist()
        s_idx, d_idx = pairs[:, 0].to(device), pairs[:, 1].to(device)

        def loop(pair_list=pair_list):
            for s, d in pair_list:
                dst[d].copy_(src[s])

        def index(s_idx=s_idx, d_idx=d_idx):
            dst.index_copy_(0, d_idx, src.index_select(0, s_idx))

        for impl in impls:
            backend = "triton" if impl == "triton" else "native"
            plan = BlockCopy(src, dst, pairs.to(device), block_bytes, backend=backend,
                             num_threads=args.threads)  # fmt: skip

            def check(plan=plan, s_idx=s_idx, d_idx=d_idx):
                dst.zero_()
                plan.run()
                return torch.equal(dst[d_idx], src[s_idx])

            yield Case(Shape("block_copy", impl, bs, n, block_bytes, n * block_bytes), plan.run,
                              {"copy": _copy_peer(n * block_bytes, device), "loop": loop,
                               "index": index}, check)  # fmt: skip


# ---- run --------------------------------------------------------------------------------------
def _records(case: Shape, seconds: float, peers: dict[str, float], timing: str) -> list[Record]:
    gbps = case.nbytes / seconds / 1e9
    name = f"{case.kernel}[{case.impl}] bs={case.block_size} blocks={case.num_blocks}"
    extra = {
        "kernel": case.kernel, "impl": case.impl, "block_size": case.block_size,
        "num_blocks": case.num_blocks, "block_bytes": case.block_bytes, "bytes": case.nbytes,
        "seconds": seconds, "timing": timing,
    }  # fmt: skip
    out = []
    for peer, t in peers.items():
        peer_gbps = case.nbytes / t / 1e9
        out.append(Record(
            bench="kernels", case=f"{name} vs {peer}", metric="GB/s", value=gbps,
            baseline=PEERS[peer], baseline_value=peer_gbps, ratio=gbps / peer_gbps,
            extra={**extra, "peer": peer, "baseline_seconds": t},
        ))  # fmt: skip
    return out


def _table(rows: list[Row]) -> str:
    head = ("kernel", "impl", "bs", "blocks", "block KiB", "MiB", "us", "GB/s", "copy_ GB/s",
            "%copy_", "loop GB/s", "x loop", "index GB/s", "x index")  # fmt: skip
    lines = [head]
    for case, t, peers in rows:
        g = case.nbytes / t / 1e9
        pg = {k: case.nbytes / v / 1e9 for k, v in peers.items()}
        lines.append((
            case.kernel, case.impl, str(case.block_size), str(case.num_blocks),
            f"{case.block_bytes / 1024:g}", f"{case.nbytes / 2**20:.3g}", f"{t * 1e6:.1f}",
            f"{g:.1f}", f"{pg['copy']:.1f}", f"{100 * g / pg['copy']:.0f}%", f"{pg['loop']:.1f}",
            f"{g / pg['loop']:.1f}x", f"{pg['index']:.1f}", f"{g / pg['index']:.1f}x",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _plot(rows: list[Row], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(c.kernel for c, _, _ in rows))
    ncols = min(2, len(kernels))
    nrows = -(-len(kernels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.8 * nrows), squeeze=False)
    styles = {"kernel": "-", "copy": "--", "loop": ":", "index": "-."}
    sizes = sorted({c.block_size for c, _, _ in rows})
    colors = dict(zip(sizes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, kernel in zip(axes.flat, kernels):
        impls = list(dict.fromkeys(c.impl for c, _, _ in rows if c.kernel == kernel))
        for bs in sizes:
            sel = [(c, t, p) for c, t, p in rows if c.kernel == kernel and c.block_size == bs]
            for impl in impls:
                mine = [r for r in sel if r[0].impl == impl]
                if not mine:
                    continue
                x = [c.num_blocks for c, _, _ in mine]
                mark = "o" if impl == impls[0] else "x"
                ax.plot(x, [c.nbytes / t / 1e9 for c, t, _ in mine], styles["kernel"],
                        marker=mark, color=colors[bs], label=f"bs={bs} {impl}")  # fmt: skip
            first = [r for r in sel if r[0].impl == impls[0]]
            x = [c.num_blocks for c, _, _ in first]
            for peer in ("copy", "loop", "index"):
                ax.plot(x, [c.nbytes / p[peer] / 1e9 for c, _, p in first], styles[peer],
                        color=colors[bs], alpha=0.6, label=f"bs={bs} {peer}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("blocks per call")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{kernel} ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("solid: epdrt kernel   dashed: copy_ of the same bytes   dotted: per-block loop"
                 "   dash-dot: index_select/index_copy_", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_cases(args: argparse.Namespace, device: torch.device, kernels: list[str],
               sizes: list[int], counts: list[int], dtype: torch.dtype, rng: Rng,
               timer: Timer) -> list[Row]:  # fmt: skip
    rows: list[Row] = []
    builders = []
    if "kv_scatter" in kernels or "kv_gather" in kernels:
        builders.append(_kv_cases)
    if "mm_embed" in kernels:
        builders.append(_mm_cases)
    if "block_copy" in kernels:
        builders.append(_copy_cases)
    for build in builders:
        for bs in sizes:
            for case in build(args, device, bs, counts, dtype, rng):
                shape = case.shape
                if shape.kernel not in kernels:
                    continue
                print(f"[kernels] {shape.kernel}[{shape.impl}] bs={bs} blocks={shape.num_blocks}",
                      file=sys.stderr, flush=True)  # fmt: skip
                if not case.check():
                    raise RuntimeError(f"{shape.kernel}[{shape.impl}] gave wrong results")
                seconds = timer(case.run)
                peers = {name: timer(fn) for name, fn in case.peers.items()}
                rows.append((shape, seconds, peers))  # shapes only: the buffers can go
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> list[Record]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.quick or device.type != "cuda"
    sizes = args.block_sizes or (CPU_BLOCK_SIZES if small else GPU_BLOCK_SIZES)
    counts = args.blocks or (CPU_BLOCKS if small else GPU_BLOCKS)
    reps = args.reps or (5 if device.type == "cpu" else 50)
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    dtype = DTYPES[args.dtype]
    rng = Rng(args.seed, device)
    timer = Timer(device, reps)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        rows = _run_cases(args, device, kernels, sizes, counts, dtype, rng, timer)
    finally:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        timing = f"CUDA events after a {FLUSH_BYTES >> 20} MiB L2 flush, median"
    else:
        timing = f"perf_counter, pre-faulted buffers, {args.threads} thread(s), median"
    records = [r for case, t, peers in rows for r in _records(case, t, peers, timing)]
    print(_table(rows), file=sys.stderr)
    plot = args.plot
    json_path = getattr(args, "json", None)
    if plot is None and json_path and json_path != "-":
        plot = str(Path(json_path).with_suffix(".png"))
    if plot and rows:
        _plot(rows, Path(plot), records[0].device)
        print(f"[kernels] plot: {plot}", file=sys.stderr)
    return records
