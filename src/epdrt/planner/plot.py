# SPDX-License-Identifier: Apache-2.0
"""PNG of SLO attainment and goodput against request rate for a few configs (matplotlib Agg,
no global pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from epdrt.planner.metrics import SLO

Curve = Sequence[tuple[float, float, float]]  # (rate req/s, attainment 0..1, good req/s)


def plot_curves(
    curves: Mapping[str, Curve],
    slo: SLO,
    path: str | os.PathLike[str],
    *,
    rate: float | None = None,
    title: str = "",
) -> None:
    """Left: share of requests meeting both SLOs against offered rate, with the target line
    (goodput is where a curve crosses it). Right: requests per second meeting both SLOs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for label, pts in curves.items():
        xs = [p[0] for p in pts]
        left.plot(xs, [100 * p[1] for p in pts], marker="o", ms=3, label=label)
        right.plot(xs, [p[2] for p in pts], marker="o", ms=3, label=label)
    left.axhline(100 * slo.target, color="gray", ls="--", lw=1)
    left.set_xlabel("request rate (req/s)")
    left.set_ylabel("requests meeting TTFT and TPOT SLOs (%)")
    left.set_ylim(0, 102)
    right.set_xlabel("request rate (req/s)")
    right.set_ylabel("good requests per second")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if rate is not None:
            ax.axvline(rate, color="black", ls=":", lw=1)
    left.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        title or f"SLO TTFT <= {slo.ttft_s:g}s, TPOT <= {slo.tpot_s * 1e3:g}ms", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path))
