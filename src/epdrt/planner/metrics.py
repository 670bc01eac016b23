# SPDX-License-Identifier: Apache-2.0
"""SLOs and the per-request latency metrics the simulator and the planner share.

TTFT: arrival to the first output token (the end of the request's prefill), seconds.
TPOT: (finish - first token) / (output tokens - 1), seconds; 0 for a one-token output.
A request meets the SLOs when both its TTFT and its TPOT are within them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epdrt.errors import InvalidArgument


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds and the share of requests that must meet both.

    Goodput is the highest request rate at which at least ``target`` of requests meet both.
    """

    ttft_s: float
    tpot_s: float
    target: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or not 0 < self.target <= 1:
            raise InvalidArgument(f"bad SLO {self}: latencies > 0, 0 < target <= 1")

    def met(self, ttft_s: np.ndarray, tpot_s: np.ndarray) -> np.ndarray:
        """Per request: both SLOs met (NaN, an unfinished request, counts as missed)."""
        with np.errstate(invalid="ignore"):
            return (ttft_s <= self.ttft_s) & (tpot_s <= self.tpot_s)

    def attainment(self, ttft_s: np.ndarray, tpot_s: np.ndarray) -> float:
        """Share of requests meeting both SLOs."""
        return float(np.mean(self.met(ttft_s, tpot_s))) if len(ttft_s) else 0.0


def quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (0..1) of the finite values, NaN when there are none."""
    v = values[np.isfinite(values)]
    return float(np.quantile(v, q)) if len(v) else float("nan")


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean and the 50/90/99th percentiles, in the values' units."""
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.quantile(v, [0.5, 0.9, 0.99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}
