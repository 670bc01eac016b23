# SPDX-License-Identifier: Apache-2.0
"""Simulator predictions against real measurements, as benchmark records.

One record per (configuration, metric) with ``"bench": "planner"``: ``value`` is the
prediction, ``baseline_value`` the measurement, ``ratio = min / max`` of the two (1.0 is a
perfect prediction, whichever side is larger).

Typical use once ``epdrt run`` exists: replay the measured run's requests as a trace,
``predict(profile, config, trace_requests)``, then
``validation_records(config, prediction.as_dict(), measured)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epdrt.errors import InvalidArgument
from epdrt.planner.config import DeployConfig

# The metrics predict() gives, with their units.
METRICS = {
    "ttft_p50_s": "s",
    "ttft_p90_s": "s",
    "tpot_p50_s": "s",
    "tpot_p90_s": "s",
    "throughput_rps": "req/s",
    "output_tokens_per_s": "tokens/s",
    "slo_attainment": "share",
}


def agreement(predicted: float, measured: float) -> float:
    """min / max of the two (both >= 0); 1.0 when both are 0."""
    if predicted < 0 or measured < 0:
        raise InvalidArgument("predicted and measured values must be >= 0")
    hi = max(predicted, measured)
    return 1.0 if hi == 0 else min(predicted, measured) / hi


def validation_records(
    config: DeployConfig,
    predicted: Mapping[str, float],
    measured: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> list[Any]:
    """One ``Record`` per metric present in both ``predicted`` and ``measured``.

    Args:
        predicted: metric name (see METRICS) to the simulator's value.
        measured: metric name to the value measured by a real run of the same config.
        extra: more context for every record (trace name, rate, profile name).
    """
    from epdrt.benchmarking import Record  # imports torch; keep it off the planner's path

    out = []
    for metric in predicted:
        if metric not in measured:
            continue
        p, m = float(predicted[metric]), float(measured[metric])
        out.append(
            Record(
                bench="planner",
                case=f"{config.label()} {metric}",
                metric=metric,
                value=p,
                baseline="measured (epdrt run)",
                baseline_value=m,
                ratio=agreement(p, m),
                extra={
                    "predicted": p,
                    "measured": m,
                    "unit": METRICS.get(metric, ""),
                    "config": config.to_dict(),
                    **dict(extra or {}),
                },
            )
        )
    return out
