# SPDX-License-Identifier: Apache-2.0
"""Replays timed requests against a cluster and summarizes latency and throughput."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from epdrt.runtime.cluster import EPDCluster
from epdrt.runtime.request import RequestResult
from epdrt.runtime.workload import TimedRequest


def replay(
    cluster: EPDCluster, workload: Sequence[TimedRequest], *, progress: bool = True, label: str = ""
) -> tuple[list[RequestResult], float]:
    """Submits each request at its arrival time; returns results (in workload order) and the
    wall time from the first submission to the last completion, in seconds."""
    start = time.monotonic()
    futures = []
    for item in workload:
        delay = start + item.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(cluster.submit(item.request))
    results = []
    tty = sys.stderr.isatty()
    step = max(1, len(futures) // 4)  # without a terminal: a line every quarter
    for i, fut in enumerate(futures):
        results.append(fut.result())
        done = i + 1
        if progress and (tty or done % step == 0 or done == len(futures)):
            line = f"[{label}] {done}/{len(futures)} requests done"
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr)
    if progress and tty:
        print(file=sys.stderr)
    return results, time.monotonic() - start


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(
    results: Sequence[RequestResult],
    wall_s: float,
    *,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
) -> dict[str, Any]:
    """Latency percentiles, throughput and SLO attainment of finished requests."""
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    tokens = sum(len(r.token_ids) for r in ok)
    summary: dict[str, Any] = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p90_s": percentile(tpot, 90),
        "encode_mean_s": statistics.fmean([r.encode_s for r in ok]) if ok else None,
    }
    if slo_ttft_s is not None and slo_tpot_s is not None:
        met = [
            r for r in ok
            if r.ttft_s is not None and r.ttft_s <= slo_ttft_s
            and (r.tpot_s is None or r.tpot_s <= slo_tpot_s)
        ]  # fmt: skip
        summary["slo_attainment"] = len(met) / len(results) if results else None
        summary["goodput_requests_per_s"] = len(met) / wall_s if wall_s > 0 else None
    return summary
