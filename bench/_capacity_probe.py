# SPDX-License-Identifier: Apache-2.0
"""Measuring memory by allocating it: a budget ledger per emulated device, peak-memory meters
for CPU and CUDA, activation curves measured on demand, and the grow-then-back-off search.

Used by ``bench/capacity.py``. Units: bytes, unless a name says otherwise.

NOTE: one process stands in for every device of a deployment. Each emulated device has a
``Ledger`` holding what was really allocated for it (weights' storage bytes, cache regions'
bytes, the measured activation peak of its stages) against the budget; an allocation that would
take the ledger past the budget raises ``DeviceOutOfMemory`` (a ``MemoryError``) before any
memory is touched, as a device of that size would. Real out-of-memory errors (``MemoryError``,
``torch.OutOfMemoryError``, a region that cannot be mapped) are caught the same way. Before
each real allocation the host's free memory is checked too, so that the probe backs off
instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

GiB = 1 << 30
MiB = 1 << 20

#: Host memory the probe never takes (bytes): room for the interpreter, other processes.
HOST_MARGIN = 2 * GiB
#: Substrings of out-of-memory messages from torch, the CUDA runtime and mmap.
_OOM_TEXT = (
    "out of memory",
    "cannot allocate memory",
    "can't allocate memory",
    "cudaerrormemoryallocation",
    "defaultcpuallocator",
)


class DeviceOutOfMemory(MemoryError):
    """An emulated device (ledger) or the host has no room for an allocation."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of memory" (emulated, host, torch or CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        torch.cuda, "OutOfMemoryError", None
    )
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, (RuntimeError, OSError)):
        text = str(exc).lower()
        return any(t in text for t in _OOM_TEXT)
    return False


def storage_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (meta tensors count 0)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's materialized parameters and buffers (shared storage counted once)."""
    return storage_bytes([*module.parameters(), *module.buffers()])


class Meter:
    """Peak-memory measurement and host checks on one torch device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def peak_during(self, fn: Callable[[], Any]) -> int:
        """Peak bytes allocated while ``fn()`` runs, over what was allocated before it.

        CUDA: ``torch.cuda.max_memory_allocated``. CPU: the CPU allocator's allocation and free
        events as the profiler records them (``profile_memory=True``), summed in time order.
        Outputs ``fn`` returns are live at its end, so they count.
        """
        if self.is_cuda:
            self.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            self.synchronize()
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return max(int(peak), 0)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            if e.device_type() == torch._C._autograd.DeviceType.CPU:
                cur += e.nbytes()
                peak = max(peak, cur)
        return int(peak)

    def host_free(self) -> int:
        """Bytes the device can still give out (CPU: MemAvailable; CUDA: cudaMemGetInfo)."""
        if self.is_cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free) + int(
                torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            )
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return 1 << 62

    def check_host(self, nbytes: float) -> None:
        """Raises DeviceOutOfMemory when the machine cannot hold ``nbytes`` more."""
        free = self.host_free() - HOST_MARGIN
        if nbytes > free:
            raise DeviceOutOfMemory(
                f"the host has {max(free, 0) / GiB:.2f} GiB to spare, {nbytes / GiB:.2f} GiB asked"
            )

    def cleanup(self, collect: bool = False) -> None:
        """Gives cached device memory back; ``collect`` also runs the cycle collector (slow:
        ~0.2 s with transformers loaded; caches are freed by reference counting anyway)."""
        if collect:
            gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()


@dataclass
class Ledger:
    """What one emulated device holds, by item, against ``budget`` bytes.

    ``ooms`` counts the out-of-memory errors caught while probing this device, ``real_ooms``
    those raised by an allocator (not by this ledger's budget check); ``host_limited`` is set
    when the host, not the budget, refused an allocation.
    """

    name: str
    budget: float
    held: dict[str, int] = field(default_factory=dict)
    ooms: int = 0
    real_ooms: int = 0
    host_limited: bool = False

    def caught(self, exc: BaseException) -> None:
        """Counts one out-of-memory error caught while probing this device."""
        self.ooms += 1
        if not isinstance(exc, DeviceOutOfMemory):
            self.real_ooms += 1

    @property
    def used(self) -> int:
        return sum(self.held.values())

    def room(self) -> float:
        return self.budget - self.used

    def check(self, nbytes: float, what: str) -> None:
        """Raises DeviceOutOfMemory if ``nbytes`` more would not fit the budget."""
        if nbytes > self.room():
            raise DeviceOutOfMemory(
                f"{self.name}: {what} needs {nbytes / MiB:.1f} MiB,"
                f" {max(self.room(), 0) / MiB:.1f} MiB of {self.budget / MiB:.1f} MiB left"
            )

    def charge(self, what: str, nbytes: int) -> None:
        """Records ``nbytes`` under ``what`` (replacing an earlier charge); checks the budget."""
        old = self.held.pop(what, 0)
        try:
            self.check(nbytes, what)
        except DeviceOutOfMemory:
            self.held[what] = old
            raise
        self.held[what] = int(nbytes)

    def release(self, what: str) -> None:
        self.held.pop(what, None)

    @contextmanager
    def scope(self) -> Iterator[Ledger]:
        """Restores the held items on exit (what a probe step charged is given back)."""
        saved = dict(self.held)
        try:
            yield self
        finally:
            self.held = saved


def allocate(ledger: Ledger, meter: Meter, what: str, nbytes: int, make: Callable[[], Any]) -> Any:
    """Really allocates ``make()`` (expected ``nbytes``) and charges it to ``ledger``.

    Checks the budget and the host before touching memory. Raises an OOM (see ``is_oom``)
    and leaves nothing charged when it does not fit.
    """
    ledger.check(nbytes, what)
    try:
        meter.check_host(nbytes)
    except DeviceOutOfMemory:
        ledger.host_limited = True
        raise
    obj = make()
    actual = int(getattr(getattr(obj, "region", None), "nbytes", nbytes))
    ledger.charge(what, actual)
    return obj


def grow(add: Callable[[int, int], None], *, first: int = 1, limit: int = 1 << 40) -> int:
    """The largest total of units that fits, found by growing chunk by chunk.

    ``add(total, step)`` allocates ``step`` more units on top of the ``total`` already held and
    keeps them, or raises an out-of-memory error with nothing new held. While allocations
    succeed the total doubles (``first``, 2 ``first``, 4 ``first``, ...); after the first OOM
    the chunk halves at every try (a binary search on the rest), so the result is exact for a
    monotone fit and every unit is allocated about once. Other errors propagate.
    """
    total, step, doubling = 0, max(1, first), True
    while step >= 1 and total < limit:
        step = min(step, limit - total)
        try:
            add(total, step)
        except Exception as exc:
            if not is_oom(exc):
                raise
            doubling = False
            step //= 2
            continue
        total += step
        step = total if doubling else step // 2
    return total


def largest_fitting(fits: Callable[[int], bool], hi: int) -> int:
    """The largest ``n <= hi`` with ``fits(n)`` (monotone), trying ``hi`` first: galloping
    down from ``hi`` on failure, then bisecting. 0 if nothing fits."""
    if hi <= 0:
        return 0
    if fits(hi):
        return hi
    bad, d = hi, 1
    while True:
        n = hi - d
        if n <= 0:
            good = 0
            break
        if fits(n):
            good = n
            break
        bad, d = n, d * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


@dataclass
class Curve:
    """Peak activation bytes of one stage against its size ``x`` (images or tokens).

    ``x <= max_measured`` is measured (once, then remembered); beyond that, the least-squares
    line through the measured points is used and the point is marked extrapolated. A
    measurement that runs out of memory records ``inf``.
    """

    name: str
    measure: Callable[[int], int]
    max_measured: int
    points: dict[int, float] = field(default_factory=dict)
    extrapolated: set[int] = field(default_factory=set)

    def __call__(self, x: int) -> float:
        if x <= 0:
            return 0.0
        if x in self.points:
            return self.points[x]
        if x <= self.max_measured:
            try:
                self.points[x] = float(self.measure(x))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self.points[x] = math.inf
            return self.points[x]
        self.extrapolated.add(x)
        return self.fit(x)

    def fit(self, x: float) -> float:
        """The least-squares line through the finite measured points, at ``x`` (>= 0)."""
        pts = [(k, v) for k, v in self.points.items() if math.isfinite(v)]
        if not pts:
            return math.inf
        if len(pts) == 1:
            k, v = pts[0]
            return v * x / k
        n = len(pts)
        mx = sum(k for k, _ in pts) / n
        my = sum(v for _, v in pts) / n
        sxx = sum((k - mx) ** 2 for k, _ in pts)
        slope = sum((k - mx) * (v - my) for k, v in pts) / sxx
        return max(my + slope * (x - mx), 0.0)

    def slope(self) -> float:
        """Bytes per unit of ``x``: the fitted line's slope (through 0 for a single point)."""
        pts = [(k, v) for k, v in self.points.items() if math.isfinite(v)]
        if not pts:
            return 0.0
        if len(pts) == 1:
            return pts[0][1] / pts[0][0]
        mx = sum(k for k, _ in pts) / len(pts)
        my = sum(v for _, v in pts) / len(pts)
        sxx = sum((k - mx) ** 2 for k, _ in pts)
        return sum((k - mx) * (v - my) for k, v in pts) / sxx

    def residual(self) -> float:
        """Largest relative distance of a measured point from the fitted line (0 = a line)."""
        pts = [(k, v) for k, v in self.points.items() if math.isfinite(v) and v > 0]
        return max((abs(self.fit(k) - v) / v for k, v in pts), default=0.0)

    def source(self, x: int) -> str:
        """ "measured" or "extrapolated" for a size asked before."""
        return "extrapolated" if x in self.extrapolated and x not in self.points else "measured"
