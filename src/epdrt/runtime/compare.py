# SPDX-License-Identifier: Apache-2.0
"""Run one workload through several deployments and compare them (demo, bench e2e)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epdrt.runtime.cluster import EPDCluster
from epdrt.runtime.config import EPDConfig
from epdrt.runtime.driver import replay, summarize
from epdrt.runtime.request import RequestResult
from epdrt.runtime.workload import TimedRequest


@dataclass
class ModeRun:
    """One deployment's results on the workload."""

    label: str
    config: EPDConfig
    results: list[RequestResult]
    summary: dict[str, Any]
    worker_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    worker_devices: dict[str, str] = field(default_factory=dict)

    @property
    def shares_devices(self) -> bool:
        """True when two of its workers ran on one GPU (they then competed for it)."""
        gpus = [d for d in self.worker_devices.values() if d != "cpu"]
        return len(gpus) != len(set(gpus))

    def peak_memory_by_stage(self) -> dict[str, float]:
        """Largest peak memory (bytes) among the workers of each stage combination."""
        out: dict[str, float] = {}
        roles = dict(self.config.worker_roles())
        for name, stats in self.worker_stats.items():
            stage = "+".join(
                r[0].upper() for r in ("encode", "prefill", "decode") if r in roles[name]
            )
            out[stage] = max(out.get(stage, 0.0), stats.get("peak_memory_bytes", 0.0))
        return out

    def counter(self, name: str) -> float:
        return sum(s.get(name, 0.0) for s in self.worker_stats.values())

    @property
    def kv_handoff_s(self) -> float | None:
        """Mean seconds from the end of a sequence's prefill to its decoder having its KV
        (None: no sequence went from one worker to another)."""
        n = self.counter("kv_handoffs")
        return self.counter("kv_handoff_seconds") / n if n else None


def run_modes(
    model_dir: str | os.PathLike[str],
    workload: list[TimedRequest],
    configs: list[tuple[str, EPDConfig]],
    *,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    progress: bool = True,
) -> list[ModeRun]:
    """Launches each config in turn, replays the workload, shuts it down, summarizes."""
    runs = []
    for label, config in configs:
        with EPDCluster.launch(Path(model_dir), config) as cluster:
            results, wall = replay(cluster, workload, progress=progress, label=label)
        summary = summarize(results, wall, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)
        runs.append(
            ModeRun(
                label, config, results, summary, cluster.worker_stats(), cluster.worker_devices()
            )
        )
    return runs


def token_mismatches(a: ModeRun, b: ModeRun) -> list[str]:
    """Ids of requests whose generated tokens differ between two runs (or failed in one)."""
    out = []
    for ra, rb in zip(a.results, b.results):
        if ra.error or rb.error or ra.token_ids != rb.token_ids:
            out.append(ra.id)
    return out


def format_runs(runs: list[ModeRun]) -> str:
    """A table: TTFT p50/p90, TPOT p50, requests/s, failures, the mean KV hand-off and peak
    memory per stage."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f}"

    rows = [
        (
            "mode",
            "TTFT p50 ms",
            "TTFT p90 ms",
            "TPOT p50 ms",
            "req/s",
            "failed",
            "KV hand-off ms",
            "peak MiB by stage",
        )
    ]
    for run in runs:
        s = run.summary
        mem = ", ".join(
            f"{k} {v / 2**20:.0f}" for k, v in sorted(run.peak_memory_by_stage().items())
        )
        rows.append((
            run.label, ms(s["ttft_p50_s"]), ms(s["ttft_p90_s"]), ms(s["tpot_p50_s"]),
            f"{s['requests_per_s']:.2f}" if s["requests_per_s"] else "-", str(s["failed"]),
            ms(run.kv_handoff_s), mem,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_runs(runs: list[ModeRun], path: str | os.PathLike[str], title: str) -> None:
    """Bar charts of TTFT p50/p90, TPOT p50 and throughput per mode, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in runs]
    panels = [
        ("TTFT (ms)", [("p50", "ttft_p50_s"), ("p90", "ttft_p90_s")], 1000),
        ("TPOT (ms)", [("p50", "tpot_p50_s"), ("p90", "tpot_p90_s")], 1000),
        ("throughput (req/s)", [("", "requests_per_s")], 1),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (name, series, scale) in zip(axes, panels):
        width = 0.8 / len(series)
        for j, (tag, key) in enumerate(series):
            values = [(r.summary.get(key) or 0) * scale for r in runs]
            xs = [i + j * width for i in range(len(runs))]
            ax.bar(xs, values, width=width, label=tag or None)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(runs))], labels)
        ax.set_title(name)
        if len(series) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
