# SPDX-License-Identifier: Apache-2.0
"""The CPU host's speed and interference, measured on a model's own batches in processes of
their own (used by ``bench/planner.py``).

A shared CPU host's speed drifts by tens of percent over minutes (2026-12-02: a 16 x 256-token
prefill took 419 ms while profiling and 555 ms twenty minutes later), so a profile taken
minutes before a run misprices it. ``SpeedProbe.seconds()`` times a fixed set of mid-size
batches (an 8 x 256-token prefill, half the runtime's default prefill budget, and a
16-sequence decode step at 256 tokens; one thread, median of 7);
the ratio of a probe taken beside a run to the one taken beside the profile scales the
profile's batch latencies for that run. ``interference()`` times the same batches with and
without a second process running them too (paused and resumed in turn): processes on separate
cores still share caches and memory bandwidth.

The probe runs in a process of its own, never in the caller's: a caller that also runs an
``EPDCluster`` router has threads that take the GIL, which would slow a probe there and not
the workers.

``python -m epdrt.bench._speed_probe MODEL_DIR serve|loop``: ``serve`` answers each line
``probe`` on stdin with the probe's seconds on stdout; ``loop`` runs the batches until killed.
Both print ``ready`` first.
"""

from __future__ import annotations

import select
import signal
import statistics
import subprocess
import sys
import time
from typing import IO

REPEATS = 7


class SpeedProbe:
    """A probe process for ``model_dir``; ``reference`` is the median of its first
    ``reference_probes`` probes (one probe moved a whole repeat's ratios by ~5%: its six
    ratios were 1.04-1.10 where the other repeats' were 0.97-1.06, and the runs' CPU did not
    follow). Close it (or use it as a context manager) to end the process."""

    def __init__(self, model_dir: str, timeout_s: float = 180.0, reference_probes: int = 5) -> None:
        self.model_dir = model_dir
        self.timeout_s = timeout_s
        self._proc = _start(model_dir, "serve", timeout_s)
        self.reference = statistics.median(self.seconds() for _ in range(reference_probes))

    def seconds(self) -> float:
        """The probe's seconds now (median over its repeats)."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write("probe\n")
        stdin.flush()
        return float(_read_line(stdout, self.timeout_s, "the speed probe did not answer"))

    def ratio(self, probes: list[float]) -> float:
        """The mean of ``probes`` (seconds) over the reference."""
        return statistics.fmean(probes) / self.reference

    def interference(self, rounds: int = 5) -> float:
        """Probe time while a second process runs the same batches over probe time alone,
        minus 1 (at least 0): the simulator's ``host_interference``. The second process is
        paused (SIGSTOP) and resumed in turn, ``rounds`` times, and the median of the rounds'
        ratios counts: one pair of probes moves with the host's drift."""
        other = _start(self.model_dir, "loop", self.timeout_s)
        ratios = []
        try:
            for _ in range(rounds):
                other.send_signal(signal.SIGSTOP)
                alone = self.seconds()
                other.send_signal(signal.SIGCONT)
                ratios.append(self.seconds() / alone)
        finally:
            _stop(other)
        return max(statistics.median(ratios) - 1.0, 0.0)

    def close(self) -> None:
        _stop(self._proc)

    def __enter__(self) -> SpeedProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start(model_dir: str, mode: str, timeout_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "epdrt.bench._speed_probe", model_dir, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if _read_line(proc.stdout, timeout_s, f"the {mode} probe did not start") != "ready":
            raise RuntimeError(f"the {mode} probe did not start")
    except BaseException:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=30)


def _read_line(stream: IO[str], timeout_s: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        raise RuntimeError(f"{what} within {timeout_s:.0f} s")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what}: the process exited")
    return line.strip()


def _main(model_dir: str, mode: str) -> None:
    import torch

    from epdrt.host_memory import keep_freed_host_memory
    from epdrt.planner.model_runner import ModelStageRunner

    keep_freed_host_memory()  # as the runtime's CPU workers
    torch.set_num_threads(1)
    runner = ModelStageRunner(model_dir, "cpu")

    def batches() -> None:
        runner.prefill(256, 8)
        runner.decode(16, 256)

    batches()
    print("ready", flush=True)
    if mode == "loop":
        while True:
            batches()
    for line in sys.stdin:
        if line.strip() != "probe":
            continue
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            batches()
            times.append(time.perf_counter() - start)
        print(statistics.median(times), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
