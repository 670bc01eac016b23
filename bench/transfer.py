# SPDX-License-Identifier: Apache-2.0
"""Bandwidth and latency of transfers between two processes, against an in-process copy.

For each transport (``ipc``: memfd shared memory on CPU, CUDA IPC on GPU; ``dist``:
torch.distributed gloo on CPU / NCCL on GPU over loopback; ``nixl`` when installed), payload
size and block size: this process writes a payload of ``payload / block`` blocks (random source
and destination block ids, so the engine cannot coalesce them into one copy) into the region of
a receiver process (``epdrt.transfer.scripted_peer``), which timestamps the notices it gets.

- Bandwidth (GB/s, 1e9 bytes/s): ``transfers * payload / (last notice - first submit)`` while
  up to ``--window`` transfers are in flight (submitted, bytes not yet landed).
- Latency (us): one transfer alone, from its submit here to its notice at the receiver (the
  bytes are visible there): median, average and p99. Both processes read CLOCK_MONOTONIC,
  which one host shares. Post time: how long the submit call itself takes (nixlbench's).

The limit is a plain copy of the payload's bytes inside this process, between two
preallocated, pre-touched buffers, sampled before the transfer runs of every case (the same
run, the same host load, warm caches on both sides). GPU: ``copy_`` between CUDA tensors
(cudaMemcpy device-to-device), CUDA events. CPU: the fastest of memcpy (glibc, as the engine's
threads use it) and ``torch.Tensor.copy_``, each on one thread and on as many threads as the
transfer engine has; ``perf_counter`` around a loop of copies. ``ratio`` is transfer GB/s /
copy GB/s for bandwidth and copy time / transfer latency for latency. Values are medians of
``--reps`` runs after a warm-up; every case's bytes are checked at the receiver (blake2b)
before it is timed. Each transport's path (``transfer.links``: what carries the bytes, and
whether that is slower than this host allows) is printed and kept in the records;
``--strict`` fails a transport on a slower path instead.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import math
import os
import re
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from epdrt.benchmarking import Record
from epdrt.errors import TransferError
from epdrt.region import Region
from epdrt.transfer import SendHandle, TransferAgent, TransferEngine, nixl_available
from epdrt.transfer.scripted_peer import Command, digest, encode, spawn, stop

HELP = "GB/s and latency of ipc/dist/nixl transfers between processes vs an in-process copy"

KiB, MiB = 1 << 10, 1 << 20
FULL_PAYLOADS = [4 * KiB << 2 * i for i in range(9)]  # 4 KiB .. 256 MiB, x4
FULL_BLOCKS = [4 * KiB << 2 * i for i in range(5)]  # 4 KiB .. 1 MiB, x4
#: (payload, block) pairs of the default sweep: the 4 KiB latency case, 16 KiB blocks from
#: 64 KiB to 64 MiB (the target: >= 90% of the copy from 1 MiB on) and 1 MiB blocks.
DEFAULT_CASES = (
    [(4 * KiB, 4 * KiB)]
    + [(p, 16 * KiB) for p in (64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB)]
    + [(p, MiB) for p in (4 * MiB, 64 * MiB)]
)
#: added on GPUs, where a 64 MiB device copy takes tens of microseconds
GPU_EXTRA_CASES = [(256 * MiB, 16 * KiB), (256 * MiB, MiB)]
QUICK_CASES = [(4 * KiB, 4 * KiB), (64 * KiB, 16 * KiB), (MiB, 16 * KiB)]
TARGET_RATIO = 0.9  # of the copy, for payloads >= 1 MiB of 16 KiB blocks
LATENCY_BUDGET_S = 0.3  # per latency case, beyond the minimum number of runs
SAMPLE_S = 1e-3  # shortest timed loop of the CPU copy
CHILD_TIMEOUT_S = 300.0


def _size(text: str) -> int:
    """Bytes from ``4096``, ``4K``, ``4KiB``, ``16M``, ``1G``."""
    found = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not found:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 16K, 1MiB)")
    return int(found[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[found[2].upper()]


def _sizes(text: str) -> list[int]:
    return [_size(x) for x in text.split(",") if x.strip()]


def _fmt(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return f"{nbytes}B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = "ipc,dist" + (",nixl" if nixl_available() else "")
    parser.add_argument("--transports", default=default, help=f"comma-separated ({default})")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument(
        "--full", action="store_true",
        help="every payload 4KiB..256MiB x every block 4KiB..1MiB (x4 steps)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="three small cases (seconds)")
    parser.add_argument(
        "--payloads", type=_sizes, default=None,
        help="payload sizes, e.g. 4K,1M,64M, crossed with --blocks (default 16K, or the payload"
             " when smaller)",
    )  # fmt: skip
    parser.add_argument("--blocks", type=_sizes, default=None, help="block sizes, e.g. 16K,1M")
    parser.add_argument("--max-payload", type=_size, default=None, help="drop larger payloads")
    parser.add_argument("--reps", type=int, default=5, help="timed bandwidth runs (median)")
    parser.add_argument("--latency-reps", type=int, default=20, help="most timed latency runs")
    parser.add_argument("--window", type=int, default=8, help="transfers in flight (bandwidth)")
    parser.add_argument(
        "--min-bytes", type=_size, default=64 * MiB,
        help="bytes moved per bandwidth run (at least --window transfers)",
    )  # fmt: skip
    parser.add_argument("--max-transfers", type=int, default=256, help="per bandwidth run")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="transfer engine threads here (0: min(4, CPUs)); the CPU copy may use as many",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true",
        help="fail a transport whose bytes would take a slower path than this placement allows"
             " (e.g. NIXL falling back to TCP) instead of warning",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="PNG path (default: beside --json)")


def cases_from_args(args: argparse.Namespace, gpu: bool = False) -> list[tuple[int, int]]:
    """The (payload bytes, block bytes) pairs to run, smallest payload first."""
    if args.payloads or args.blocks:
        payloads = args.payloads or FULL_PAYLOADS
        if args.blocks:
            cases = [(p, b) for p in payloads for b in args.blocks if b <= p and p % b == 0]
        else:
            cases = [(p, min(p, 16 * KiB)) for p in payloads if p % min(p, 16 * KiB) == 0]
    elif args.full:
        cases = [(p, b) for p in FULL_PAYLOADS for b in FULL_BLOCKS if b <= p]
    elif args.quick:
        cases = list(QUICK_CASES)
    else:
        cases = DEFAULT_CASES + (GPU_EXTRA_CASES if gpu else [])
    if args.max_payload:
        cases = [c for c in cases if c[0] <= args.max_payload]
    return sorted(dict.fromkeys(cases))


# ---- the limit: a plain copy in this process ---------------------------------------------------
class ParallelMemcpy:
    """Back-to-back memcpys of ``nbytes`` from address ``src`` to ``dst``, each split over
    ``threads`` threads, the calling one included (``ctypes.memmove`` releases the GIL).

    ``copy(n)`` has every thread copy its share ``n`` times, then waits for all: one handoff
    per call, not per copy, like the engine's threads working through queued transfers.
    """

    def __init__(self, dst: int, src: int, nbytes: int, threads: int) -> None:
        bounds = [nbytes * i // threads for i in range(threads + 1)]
        self._parts = [(dst + lo, src + lo, hi - lo) for lo, hi in itertools.pairwise(bounds)]
        self._go, self._done = threading.Barrier(threads), threading.Barrier(threads)
        self._count = 0  # copies per thread in the current call; -1 stops the threads
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(1, threads)]  # fmt: skip
        for t in self._threads:
            t.start()

    def _share(self, part: int) -> None:
        dst, src, n = self._parts[part]
        for _ in range(self._count):
            ctypes.memmove(dst, src, n)

    def _loop(self, part: int) -> None:
        while True:
            self._go.wait()
            if self._count < 0:
                return
            self._share(part)
            self._done.wait()

    def copy(self, n: int) -> None:
        self._count = n
        self._go.wait()
        self._share(0)
        self._done.wait()

    def close(self) -> None:
        self._count = -1
        self._go.wait()
        for t in self._threads:
            t.join()


@dataclass
class _Copy:
    """One way of copying ``nbytes``: ``fn(n)`` copies ``n`` times back to back; a sample
    times ``fn(inner)``."""

    name: str
    fn: Callable[[int], Any]
    threads: int  # torch intra-op threads while it runs (0: leave as is)
    inner: int = 1
    samples: list[float] = field(default_factory=list)  # seconds per copy


class CopyLimit:
    """Seconds of the fastest plain copy of ``nbytes`` between two preallocated buffers.

    Call :meth:`sample` next to the transfer runs; :meth:`seconds` is the smallest per-way
    median of the samples taken so far. Each way copies between the same two buffers again and
    again (warm caches, like the transfer runs, which also reuse their source and destination).
    """

    def __init__(self, device: torch.device, threads: int, reps: int) -> None:
        self.device, self.reps = device, max(3, reps)
        self.thread_counts = sorted({1, max(1, threads)})
        self._copies: dict[int, list[_Copy]] = {}
        self._closers: list[Callable[[], None]] = []

    def _prepare(self, nbytes: int) -> list[_Copy]:
        if nbytes in self._copies:
            return self._copies[nbytes]
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=self.device)
        dst = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)  # pages touched

        def torch_copy(n: int) -> None:
            for _ in range(n):
                dst.copy_(src)

        if self.device.type == "cuda":
            copies = [_Copy("cudaMemcpy D2D (copy_)", torch_copy, 0)]
        else:
            copies = []
            for t in self.thread_counts:
                memcpy = ParallelMemcpy(dst.data_ptr(), src.data_ptr(), nbytes, t)
                self._closers.append(memcpy.close)
                copies.append(_Copy(f"memcpy x{t} thread(s)", memcpy.copy, 1))
                copies.append(_Copy(f"copy_ x{t} thread(s)", torch_copy, t))
        for copy in copies:
            copy.inner = max(1, int(SAMPLE_S / max(self._time(copy), 1e-7)))
            dst.zero_()
            copy.fn(1)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if not torch.equal(src, dst):
                raise RuntimeError(f"the baseline copy {copy.name} is wrong")
        self._copies[nbytes] = copies
        return copies

    def _time(self, copy: _Copy) -> float:
        """Seconds per copy over ``copy.inner`` back-to-back copies (after a warm-up one)."""
        if self.device.type == "cuda":
            copy.fn(1)
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            copy.fn(copy.inner)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3 / copy.inner
        before = torch.get_num_threads()
        torch.set_num_threads(copy.threads or before)
        try:
            copy.fn(1)
            start = time.perf_counter()
            copy.fn(copy.inner)
            return (time.perf_counter() - start) / copy.inner
        finally:
            torch.set_num_threads(before)

    def sample(self, nbytes: int) -> None:
        """One more timed sample of every way of copying ``nbytes``."""
        for copy in self._prepare(nbytes):
            copy.samples.append(self._time(copy))

    def _best(self, nbytes: int) -> _Copy:
        copies = self._prepare(nbytes)
        while len(copies[0].samples) < self.reps:
            self.sample(nbytes)
        return min(copies, key=lambda c: statistics.median(c.samples))

    def seconds(self, nbytes: int) -> float:
        return statistics.median(self._best(nbytes).samples)

    def method(self, nbytes: int) -> str:
        """Which way of copying gave :meth:`seconds`."""
        return self._best(nbytes).name

    def num_samples(self, nbytes: int) -> int:
        return len(self._best(nbytes).samples)

    @property
    def name(self) -> str:
        """The records' ``baseline``."""
        if self.device.type == "cuda":
            return "cudaMemcpy D2D of the same bytes in one process"
        return "memcpy of the same bytes in one process"

    @property
    def timing(self) -> str:
        if self.device.type == "cuda":
            return "copy_ between CUDA tensors, CUDA events around >= 1 ms of copies, median"
        counts = " and ".join(str(t) for t in self.thread_counts)
        return (f"fastest of memcpy and copy_ on {counts} thread(s), pre-touched buffers,"
                " perf_counter around >= 1 ms of back-to-back copies, median")  # fmt: skip

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()
        self._copies.clear()


# ---- one transport ------------------------------------------------------------------------------
@dataclass
class Result:
    """One case: median bandwidth (bytes/s) and latency (s) of the transfer."""

    transport: str
    payload: int
    block: int
    bandwidth: float
    latency: float  # median
    latency_avg: float
    latency_p99: float
    post: float  # median seconds the sender's submit call takes (returns before the copy ends)
    transfers: int  # per bandwidth run
    latency_reps: int
    runs: int  # contiguous copies after merging adjacent blocks
    loadavg: float  # of the host (1 min), when the case ended
    path: str = ""  # what carried the bytes (transfer.links)
    path_slow: str | None = None  # why that path is slower than this host allows
    copy_seconds: float = 0.0  # the limit, filled in once every case ran


class Sender:
    """This process's side of one transport: the source region and a connected receiver."""

    def __init__(self, transport: str, region: Region, args: argparse.Namespace,
                 peer_device: torch.device) -> None:  # fmt: skip
        listen = None if transport == "ipc" else "tcp://127.0.0.1:*"
        self.args, self.region, self.transport = args, region, transport
        self.agent = TransferAgent(address=listen, engine=TransferEngine(args.threads),
                                   timeout=CHILD_TIMEOUT_S,
                                   strict=getattr(args, "strict", False))  # fmt: skip
        self.agent.register("buf", region)
        try:
            self.proc, self.peer = spawn(
                self.agent, region_bytes=region.nbytes, transport=transport,
                device=str(peer_device), listen=listen, timeout=CHILD_TIMEOUT_S,
            )  # fmt: skip
        except BaseException:
            self.agent.close()
            raise
        if self.peer.transport != transport:
            self.close()
            raise TransferError(f"asked for {transport}, got {self.peer.transport}")
        path = self.peer.path
        print(f"[transfer] {transport}: {path.detail}"
              + (f" (SLOWER THAN THIS HOST ALLOWS: {path.slow})" if path.slow else ""),
              file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                stop(self.proc, self.peer)
        finally:
            self.agent.close()

    def _cmd(self, cmd: Command) -> None:
        self.peer.notify("cmd", data=encode(cmd))

    def _done_ns(self) -> int:
        """The receiver's clock when it got the last transfer of a run."""
        return int.from_bytes(self.peer.recv("bw-done").data, "little")

    def _write(self, so: np.ndarray, do: np.ndarray, block: int) -> SendHandle:
        return self.peer.write("bw", "buf", "buf", so, do, block)

    def verify(self, so: np.ndarray, do: np.ndarray, block: int) -> None:
        """One transfer into zeroed ranges, checked against the receiver's digest of them."""
        sizes = [block] * len(do)
        self._cmd(Command(op="fill", dst_offsets=do.tolist(), sizes=sizes, value=0))
        self.peer.recv("filled")
        self._cmd(Command(op="plan", count=1))
        self._write(so, do, block).wait()
        self._done_ns()
        self._cmd(Command(op="digest", dst_offsets=do.tolist(), sizes=sizes))
        if self.peer.recv("digest").data != digest(self.region, so.tolist(), sizes):
            raise RuntimeError(f"{self.transport}: the receiver's bytes differ from the source")

    def stream(self, so: np.ndarray, do: np.ndarray, block: int, count: int) -> float:
        """Seconds from the first submit here to the ``count``-th notice at the receiver."""
        self._cmd(Command(op="plan", count=count))
        window: deque[SendHandle] = deque()
        start = time.monotonic_ns()
        for _ in range(count):
            if len(window) >= self.args.window:
                window.popleft().wait()
            window.append(self._write(so, do, block))
        for handle in window:
            handle.wait()
        return (self._done_ns() - start) / 1e9

    def latency(
        self, so: np.ndarray, do: np.ndarray, block: int, reps: int
    ) -> tuple[list[float], list[float]]:
        """Seconds from submit here to notice there of one transfer alone, and seconds the
        submit call took (posting its descriptors), ``reps`` times each."""
        self._cmd(Command(op="plan", count=1))
        total, post = [], []
        for _ in range(reps):
            start = time.monotonic_ns()
            handle = self._write(so, do, block)
            post.append((time.monotonic_ns() - start) / 1e9)
            handle.wait()
            total.append((self._done_ns() - start) / 1e9)
        return total, post


def _offsets(payload: int, block: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``[payload / block] int64`` source and destination byte offsets (random block ids)."""
    n = payload // block
    src = torch.randperm(n, generator=gen).numpy().astype(np.int64) * block
    dst = torch.randperm(n, generator=gen).numpy().astype(np.int64) * block
    return src, dst


def _num_runs(so: np.ndarray, do: np.ndarray, block: int) -> int:
    """Contiguous copies left once ops adjacent in source and destination are merged."""
    order = np.argsort(do)
    s, d = so[order], do[order]
    return 1 + int(((s[1:] != s[:-1] + block) | (d[1:] != d[:-1] + block)).sum())


def _run_case(sender: Sender, payload: int, block: int, limit: CopyLimit,
              gen: torch.Generator) -> Result:  # fmt: skip
    args = sender.args
    so, do = _offsets(payload, block, gen)
    sender.verify(so, do, block)
    count = max(args.window, min(args.max_transfers, math.ceil(args.min_bytes / payload)))
    # The limit is sampled next to every case (the same host load), but not between its runs:
    # its buffers would push the transfer's out of the caches while its own stay warm.
    for _ in range(args.reps):
        limit.sample(payload)
    sender.stream(so, do, block, count)  # warm-up
    runs = [sender.stream(so, do, block, count) for _ in range(args.reps)]
    bandwidth = count * payload / statistics.median(runs)
    guess = payload / bandwidth + 1e-4
    reps = max(3, min(args.latency_reps, int(LATENCY_BUDGET_S / guess)))
    sender.latency(so, do, block, 2)  # warm-up
    lat, post = sender.latency(so, do, block, reps)
    p99 = float(np.percentile(lat, 99))
    return Result(sender.transport, payload, block, bandwidth, statistics.median(lat),
                  statistics.fmean(lat), p99, statistics.median(post), count, reps,
                  _num_runs(so, do, block), os.getloadavg()[0], sender.peer.path.detail,
                  sender.peer.path.slow)  # fmt: skip


def _records(res: Result, limit: CopyLimit, args: argparse.Namespace,
             engine_threads: int) -> list[Record]:  # fmt: skip
    name = f"{res.transport} payload={_fmt(res.payload)} block={_fmt(res.block)}"
    copy_bw = res.payload / res.copy_seconds
    extra = {
        "transport": res.transport, "payload_bytes": res.payload, "block_bytes": res.block,
        "num_blocks": res.payload // res.block, "num_runs": res.runs, "window": args.window,
        "transfers_per_run": res.transfers, "reps": args.reps, "latency_reps": res.latency_reps,
        "engine_threads": engine_threads, "seconds_per_transfer": res.payload / res.bandwidth,
        "latency_seconds": res.latency, "latency_avg_seconds": res.latency_avg,
        "latency_p99_seconds": res.latency_p99, "post_seconds": res.post,
        "copy_seconds": res.copy_seconds,
        "timing": "monotonic_ns from submit here to the notice at the receiver, median",
        "baseline_method": limit.method(res.payload), "baseline_timing": limit.timing,
        "baseline_samples": limit.num_samples(res.payload), "verified": True,
        "loadavg_1min": res.loadavg, "path": res.path, "path_slow": res.path_slow,
    }  # fmt: skip
    return [
        Record(bench="transfer", case=name, metric="GB/s", value=res.bandwidth / 1e9,
               baseline=limit.name, baseline_value=copy_bw / 1e9,
               ratio=res.bandwidth / copy_bw, extra=dict(extra)),
        Record(bench="transfer", case=f"{name} latency", metric="us", value=res.latency * 1e6,
               baseline=limit.name, baseline_value=res.copy_seconds * 1e6,
               ratio=res.copy_seconds / res.latency, extra=dict(extra)),
    ]  # fmt: skip


def _table(results: list[Result]) -> str:
    head = ("transport", "payload", "block", "blocks", "runs", "GB/s", "copy GB/s", "%copy",
            "lat p50 us", "avg us", "p99 us", "post us", "copy us")  # fmt: skip
    lines = [head]
    for r in results:
        copy_bw = r.payload / r.copy_seconds
        lines.append((
            r.transport, _fmt(r.payload), _fmt(r.block), str(r.payload // r.block), str(r.runs),
            f"{r.bandwidth / 1e9:.2f}", f"{copy_bw / 1e9:.2f}",
            f"{100 * r.bandwidth / copy_bw:.0f}%", f"{r.latency * 1e6:.1f}",
            f"{r.latency_avg * 1e6:.1f}", f"{r.latency_p99 * 1e6:.1f}", f"{r.post * 1e6:.1f}",
            f"{r.copy_seconds * 1e6:.1f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _summary(results: list[Result]) -> str:
    """The issue's targets: >= 90% of the copy for >= 1 MiB of 16 KiB blocks; 4 KiB latency."""
    out = []
    for transport in dict.fromkeys(r.transport for r in results):
        mine = [r for r in results if r.transport == transport]
        target = [r for r in mine if r.payload >= MiB and r.block == 16 * KiB]
        if target:
            ratios = {r.payload: r.bandwidth * r.copy_seconds / r.payload for r in target}
            met = [p for p, x in ratios.items() if x >= TARGET_RATIO]
            shown = ", ".join(f"{_fmt(p)} {x:.0%}" for p, x in ratios.items())
            verdict = "met" if len(met) == len(ratios) else f"met at {len(met)}/{len(ratios)}"
            out.append(f"{transport}: 16KiB blocks vs the copy: {shown}; the {TARGET_RATIO:.0%}"
                       f" target (>= 1MiB) {verdict}")  # fmt: skip
        for r in mine:
            if r.payload == 4 * KiB:
                out.append(f"{transport}: 4KiB latency {r.latency * 1e6:.1f} us"
                           f" (copy {r.copy_seconds * 1e6:.2f} us)")  # fmt: skip
    return "\n".join(out)


def _plot(results: list[Result], path: Path, device: str, baseline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw_ax, lat_ax) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = list(dict.fromkeys((r.transport, r.block) for r in results))
    markers = dict(zip(dict.fromkeys(t for t, _ in keys), "osD^v"))
    for i, (transport, block) in enumerate(keys):
        mine = [r for r in results if (r.transport, r.block) == (transport, block)]
        x = [r.payload for r in mine]
        style = {"color": colors[i % len(colors)], "marker": markers[transport]}
        label = f"{transport} block={_fmt(block)}"
        bw_ax.plot(x, [r.bandwidth / 1e9 for r in mine], label=label, **style)
        lat_ax.plot(x, [r.latency * 1e6 for r in mine], label=label, **style)
    limit = sorted({r.payload: r.copy_seconds for r in results}.items())
    lx = [p for p, _ in limit]
    bw_ax.plot(lx, [p / s / 1e9 for p, s in limit], "k--", label=f"limit: {baseline}")
    lat_ax.plot(lx, [s * 1e6 for _, s in limit], "k--", label=f"limit: {baseline}")
    for ax, ylabel in ((bw_ax, "GB/s (1e9 B/s)"), (lat_ax, "submit -> notice at receiver (us)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lx, [_fmt(p) for p in lx], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("payload")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    bw_ax.set_title(f"bandwidth between two processes ({device})", fontsize=10)
    lat_ax.set_title(f"latency of one transfer ({device})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _source_region(nbytes: int, device: torch.device, seed: int) -> Region:
    """A region of ``nbytes`` seeded random bytes on ``device``."""
    region = Region.create(nbytes, device)
    gen = torch.Generator().manual_seed(seed)
    flat = region.tensor(torch.uint8, (nbytes,))
    for start in range(0, nbytes, 64 * MiB):
        n = min(64 * MiB, nbytes - start)
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        flat[start : start + n].copy_(data.to(device))
    return region


def _receiver_device(transport: str, device: torch.device) -> torch.device | None:
    """Where the receiver's region lives: ``device``, except that NCCL (``dist`` on GPUs)
    needs one GPU per rank; None when there is no second GPU."""
    if device.type != "cuda" or transport != "dist":
        return device
    count = torch.cuda.device_count()
    if count < 2:
        return None
    return torch.device("cuda", ((device.index or 0) + 1) % count)


def run(args: argparse.Namespace) -> list[Record]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transports = [t for t in args.transports.split(",") if t]
    unknown = set(transports) - {"ipc", "dist", "nixl"}
    if unknown:
        raise SystemExit(f"unknown transports {sorted(unknown)}; choose from ipc, dist, nixl")
    if "nixl" in transports and not nixl_available():
        print("[transfer] nixl is not installed: skipped", file=sys.stderr)
        transports.remove("nixl")
    cases = cases_from_args(args, gpu=device.type == "cuda")
    if not cases:
        raise SystemExit("no (payload, block) case left: check --payloads/--blocks/--max-payload")
    engine_threads = TransferEngine(args.threads).num_threads
    limit = CopyLimit(device, engine_threads, args.reps)
    region = _source_region(max(p for p, _ in cases), device, args.seed)
    results: list[Result] = []
    failed: list[str] = []
    try:
        for transport in transports:
            peer_device = _receiver_device(transport, device)
            if peer_device is None:
                failed.append(f"{transport}: skipped (NCCL needs a second GPU for the receiver)")
                print(f"[transfer] {failed[-1]}", file=sys.stderr)
                continue
            print(f"[transfer] {transport}: starting the receiver on {peer_device}",
                  file=sys.stderr, flush=True)  # fmt: skip
            try:
                sender = Sender(transport, region, args, peer_device)
            except (TransferError, TimeoutError) as exc:
                failed.append(f"{transport}: no receiver: {exc}")
                print(f"[transfer] {failed[-1]}", file=sys.stderr)
                continue
            gen = torch.Generator().manual_seed(args.seed)
            try:
                for payload, block in cases:
                    print(f"[transfer] {transport} payload={_fmt(payload)} block={_fmt(block)}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    results.append(_run_case(sender, payload, block, limit, gen))
            except (TransferError, TimeoutError) as exc:  # the other transports still run
                failed.append(f"{transport}: FAILED at payload={_fmt(payload)}: {exc}")
                print(f"[transfer] {failed[-1]}", file=sys.stderr)
            finally:
                sender.close()
        for res in results:
            res.copy_seconds = limit.seconds(res.payload)
        records = [r for res in results for r in _records(res, limit, args, engine_threads)]
        methods = {res.payload: limit.method(res.payload) for res in results}
    finally:
        limit.close()
    print(_table(results), file=sys.stderr)
    print("\n".join([_summary(results), *failed]), file=sys.stderr)
    print("[transfer] fastest copy per payload: "
          + ", ".join(f"{_fmt(p)} {m}" for p, m in sorted(methods.items())),
          file=sys.stderr)  # fmt: skip
    plot = args.plot
    json_path = getattr(args, "json", None)
    if plot is None and json_path and json_path != "-":
        plot = str(Path(json_path).with_suffix(".png"))
    if plot and results:
        _plot(results, Path(plot), records[0].device, limit.name)
        print(f"[transfer] plot: {plot}", file=sys.stderr)
    return records


def quick_ipc_link(device: str) -> Any:
    """The cost of one transfer between two workers as a ``TransferProfile`` (latency + bytes
    / bandwidth): this benchmark's quick ``ipc`` cases between two processes, one engine
    thread each, as the runtime hands MM tokens and KV over. Its table goes to stderr."""
    import contextlib
    from dataclasses import asdict

    from epdrt.planner.profiler import transfer_from_records

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--quick", "--transports", "ipc", "--threads", "1", "--device", device]
    with contextlib.redirect_stdout(sys.stderr):
        records = run(parser.parse_args(argv))
    return transfer_from_records([asdict(r) for r in records], transport="ipc")


def link_for_profile(device: str, progress: Callable[[str], None]) -> tuple[Any, str]:
    """``quick_ipc_link`` and a note for the profile, or (None, "") when it cannot run here
    (the profiler then times the runtime's in-process block copy)."""
    try:
        link = quick_ipc_link(device)
    except Exception as exc:  # the benchmark is optional: the profile falls back
        progress(f"transfer benchmark unavailable ({exc}); timing the block copy instead")
        return None, ""
    return link, "the transfer benchmark's quick ipc cases (between two processes), run here"
