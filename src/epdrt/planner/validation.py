# SPDX-License-Identifier: Apache-2.0
"""Simulator predictions against real measurements, as benchmark records.

One record per (configuration, metric) with ``"bench": "planner"``: ``value`` is the
prediction, ``baseline_value`` the measurement, ``ratio = min / max`` of the two (1.0 is a
perfect prediction, whichever side is larger).

Typical use (``epdrt bench planner`` does this on the tiny model): run a workload through
the real runtime, keep each request's submit time, shape and timings (``Observed``), replay
the same requests in the simulator (``observed_trace``, ``predict``) and compare
(``observed_metrics``, ``validation_records``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from epdrt.errors import InvalidArgument
from epdrt.planner.config import DeployConfig
from epdrt.planner.workload import Request

if TYPE_CHECKING:  # importing epdrt.runtime loads the models' stack (transformers)
    from epdrt.runtime.config import EPDConfig

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


# -- real runs as simulator inputs ---------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """One request of a real run: when it was submitted, its shape and what it measured.

    Attributes:
        submit_s: seconds after the run started at which the request was submitted.
        image_tokens: MM tokens of each image (after the router's preprocessing).
        prompt_tokens: text tokens (the LM's input minus image tokens).
        output_tokens: tokens generated (greedy decoding may stop early at EOS).
        ttft_s, tpot_s, e2e_s: as the runtime measured them (submit to first / last token);
            ``tpot_s`` is None for a one-token output.
        encode_s: encoder time the runtime charged to this request's images (its share of
            each encode batch, by tokens); for telling where a slow request's time went.
    """

    id: str
    submit_s: float
    image_tokens: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    encode_s: float = 0.0


def observed_trace(observed: Sequence[Observed]) -> list[Request]:
    """The simulator's requests for a real run: the same submit times and shapes."""
    return sorted(
        (
            Request(o.id, o.submit_s, o.image_tokens, o.prompt_tokens, max(o.output_tokens, 1))
            for o in observed
        ),
        key=lambda r: r.arrival_s,
    )


def observed_metrics(observed: Sequence[Observed]) -> dict[str, float]:
    """What predict() reports, from a real run: TTFT/TPOT percentiles and throughput
    (requests completed per second from the first submit to the last token, the simulator's
    definition)."""
    if not observed:
        raise InvalidArgument("no observed requests")
    ttft = np.array([o.ttft_s for o in observed])
    tpot = np.array([o.tpot_s for o in observed if o.tpot_s is not None])
    first = min(o.submit_s for o in observed)
    last = max(o.submit_s + o.e2e_s for o in observed)
    out = {
        "ttft_p50_s": float(np.quantile(ttft, 0.5)),
        "ttft_p90_s": float(np.quantile(ttft, 0.9)),
        "throughput_rps": len(observed) / (last - first) if last > first else 0.0,
    }
    if len(tpot):
        out["tpot_p50_s"] = float(np.quantile(tpot, 0.5))
        out["tpot_p90_s"] = float(np.quantile(tpot, 0.9))
    return out


def runtime_deploy_config(config: EPDConfig) -> DeployConfig:
    """The simulator's config for a runtime deployment.

    The runtime batches a prefill step up to ``prefill_max_batch_tokens`` prompt tokens with no
    padding, runs a decode step over each sequence's own context in the pages (flat batches:
    neither ``prefill_padded`` nor ``decode_padded``), and spreads a request's images over all
    encoders (``image_split`` = encoders in ``epd``), with the runtime's running-set bound,
    hand-off and KV block size.
    """
    mode = config.mode
    if mode == "epd":
        e, p, d = config.num_encode, config.num_prefill, config.num_decode
        split = e
    elif mode == "pd":
        e, p, d, split = config.num_prefill, config.num_prefill, config.num_decode, 1
    else:
        e = p = d = config.num_prefill
        split = 1
    return DeployConfig(
        mode,
        e,
        p,
        d,
        encode_batch=config.encode_max_batch_images,
        prefill_tokens=config.prefill_max_batch_tokens,
        decode_batch=config.decode_max_batch,
        image_split=split,
        prefill_padded=False,
        decode_padded=False,
        encode_tokens=config.encode_max_batch_tokens,
        max_num_seqs=config.max_num_seqs,
        kv_handoff=config.kv_handoff,
        kv_block=config.kv_block_size,
    )
