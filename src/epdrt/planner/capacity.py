# SPDX-License-Identifier: Apache-2.0
"""Closed-form bounds that let the search skip most configs without simulating them.

- Work per request (GPU-seconds per stage, at the most efficient batch the limits allow):
  a pool of n GPUs serves at most n / (work of its stages) requests per second, so a config
  whose pool is smaller than ``rate * work`` is overloaded whatever its scheduling.
- Unloaded latency: a request alone in the system still needs its encode, transfer and prefill
  time before its first token, and a decode step per token afterwards; a config whose
  unloaded TTFT or TPOT misses the SLO for too many requests misses it at any load.

Both are optimistic by construction (lower bounds on work and latency, up to the profile's
interpolation), so they prune without ruling out a config that could pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from epdrt.planner.config import POOLS, DeployConfig, memory_plan, role_stages
from epdrt.planner.metrics import SLO
from epdrt.planner.profile import StageProfile
from epdrt.planner.workload import Workload


@dataclass(frozen=True)
class WorkloadStats:
    """Per-request shape arrays of a workload (tokens, images)."""

    num_images: np.ndarray
    image_tokens: np.ndarray  # MM tokens of all the request's images
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    max_image_tokens: int
    max_request_tokens: int
    max_input_tokens: int

    @classmethod
    def of(cls, workload: Workload) -> WorkloadStats:
        rs = workload.requests
        return cls(
            num_images=np.array([r.num_images for r in rs], dtype=np.int64),
            image_tokens=np.array([sum(r.image_tokens) for r in rs], dtype=np.int64),
            input_tokens=np.array([r.input_tokens for r in rs], dtype=np.int64),
            output_tokens=np.array([r.output_tokens for r in rs], dtype=np.int64),
            max_image_tokens=max((max(r.image_tokens) for r in rs if r.image_tokens), default=1),
            max_request_tokens=max(r.input_tokens + r.output_tokens for r in rs),
            max_input_tokens=max(r.input_tokens for r in rs),
        )

    @property
    def mean_tokens_per_image(self) -> float:
        n = int(self.num_images.sum())
        return float(self.image_tokens.sum()) / n if n else 0.0

    @property
    def image_share(self) -> float:
        """Share of requests with at least one image."""
        return float(np.mean(self.num_images > 0))


@dataclass(frozen=True)
class StageWork:
    """Mean GPU-seconds per request of each stage, at the best batch the limits allow."""

    encode_s: float
    prefill_s: float
    decode_s: float
    decode_batch: int  # the largest decode batch the limits and KV capacity allow


def stage_work(profile: StageProfile, config: DeployConfig, stats: WorkloadStats) -> StageWork:
    """Per-request work of each stage under ``config``'s batch limits (seconds)."""
    # Encode: cost per image is lowest in the fullest batch the limit allows.
    tpi = stats.mean_tokens_per_image
    per_image = 0.0
    if tpi > 0:
        per_image = min(profile.encode(n, tpi) / n for n in range(1, config.encode_batch + 1))
    encode_s = per_image * float(stats.num_images.mean())
    # Prefill: a request shorter than the budget shares a batch of `prefill_tokens`;
    # a longer one runs alone.
    budget = config.prefill_tokens
    per_token_full = profile.prefill(budget) / budget
    inp = stats.input_tokens
    total = float(inp[inp <= budget].sum()) * per_token_full
    total += sum(profile.prefill(int(x)) for x in inp[inp > budget])
    prefill_s = total / len(inp)
    # Decode: the batch is bounded by the limit and by KV room for the sequences' tokens.
    plan = memory_plan(profile, config, stats.max_image_tokens)
    kv = min(gm.kv_tokens for gm in plan.values() if "decode" in gm.stages)
    per_seq_tokens = float((stats.input_tokens + stats.output_tokens).mean())
    batch = max(1, min(config.decode_batch, int(kv // max(per_seq_tokens, 1))))
    out = stats.output_tokens
    steps = np.maximum(out - 1, 0)
    # Time-averaged context of a decoding sequence, weighted by its decode steps.
    ctx = float(((stats.input_tokens + (out + 1) / 2) * steps).sum() / max(steps.sum(), 1))
    per_token = (profile.decode(batch, batch * ctx) + profile.overheads.step_s) / batch
    decode_s = per_token * float(steps.mean())
    return StageWork(encode_s, prefill_s, decode_s, batch)


def pool_work(config: DeployConfig, work: StageWork) -> dict[str, float]:
    """GPU-seconds per request each pool of ``config``'s mode spends (its stages' sum)."""
    by_stage = {"encode": work.encode_s, "prefill": work.prefill_s, "decode": work.decode_s}
    return {
        pool: sum(by_stage[s] for s in stages) for pool, stages in role_stages(config.mode).items()
    }


def capacity_rps(config: DeployConfig, work: StageWork) -> float:
    """Upper bound on the request rate ``config`` sustains (requests per second)."""
    pw = pool_work(config, work)
    return min(
        n / pw[pool] if pw[pool] > 0 else math.inf
        for pool, n in zip(POOLS[config.mode], config.pools)
    )


def min_pools(
    config: DeployConfig, work: StageWork, rate: float, utilization: float = 1.0
) -> tuple[int, ...]:
    """Fewest GPUs per pool keeping every pool's utilization at or below ``utilization``."""
    pw = pool_work(config, work)
    return tuple(
        max(1, math.ceil(rate * pw[pool] / utilization - 1e-9)) for pool in POOLS[config.mode]
    )


def balanced_pools(config: DeployConfig, work: StageWork, num_gpus: int) -> tuple[int, ...]:
    """``num_gpus`` split over the mode's pools to maximize capacity_rps (one GPU at a time
    to the pool that limits capacity)."""
    pools = POOLS[config.mode]
    pw = pool_work(config, work)
    counts = [1] * len(pools)
    for _ in range(num_gpus - len(pools)):
        i = min(range(len(pools)), key=lambda j: counts[j] / pw[pools[j]] if pw[pools[j]] else 1e30)
        counts[i] += 1
    return tuple(counts)


def unloaded_ttft(profile: StageProfile, config: DeployConfig, workload: Workload) -> np.ndarray:
    """Per request: TTFT with the system otherwise empty (seconds)."""
    mm = profile.memory.mm_bytes_per_token
    o = profile.overheads
    out = np.empty(len(workload.requests))
    split = config.image_split if config.mode in ("epd", "ed") else 1
    colocated = config.mode in ("pd", "aggregated")
    for i, r in enumerate(workload.requests):
        enc = 0.0
        if r.image_tokens:
            k = min(split, r.num_images)
            per_chunk = math.ceil(r.num_images / k)
            tpi = sum(r.image_tokens) / r.num_images
            full, rest = divmod(per_chunk, config.encode_batch)
            enc = full * profile.encode(config.encode_batch, tpi)
            enc += profile.encode(rest, tpi) if rest else 0.0
            if not colocated:
                enc += profile.transfer.seconds(per_chunk * tpi * mm) + o.message_s
        # Router preprocessing and its message to the workers; the first token's message back.
        out[i] = (
            o.router_work(r.num_images) + o.request_s + 2 * o.message_s + enc
            + profile.prefill(r.input_tokens)
        )  # fmt: skip
    return out


def unloaded_tpot(profile: StageProfile, config: DeployConfig, workload: Workload) -> np.ndarray:
    """Per request: TPOT decoding alone, KV hand-off included (seconds; 0 for one token)."""
    kvb = profile.memory.kv_bytes_per_token
    out = np.zeros(len(workload.requests))
    for i, r in enumerate(workload.requests):
        if r.output_tokens > 1:
            steps = r.output_tokens - 1
            t = profile.decode.at_x(1).sum_arithmetic(r.input_tokens + 1, 1, steps)
            t += steps * profile.overheads.step_s
            if config.mode != "aggregated":
                t += (
                    profile.transfer.seconds(r.input_tokens * kvb) + 3 * profile.overheads.message_s
                )
            out[i] = t / steps
    return out


def latency_feasible(
    profile: StageProfile, config: DeployConfig, workload: Workload, slo: SLO
) -> str | None:
    """Why ``config``'s batch limits and split cannot meet the SLOs at any load, or None."""
    ttft = unloaded_ttft(profile, config, workload)
    tpot = unloaded_tpot(profile, config, workload)
    share = float(np.mean((ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)))
    if share < slo.target:
        return f"only {share:.0%} of requests meet the SLOs even on an idle system"
    return None


def suggest_num_requests(
    profile: StageProfile,
    workload: Workload,
    rate: float,
    low: int = 1000,
    high: int = 3000,
) -> int:
    """Requests per simulation so that a run spans about 6 request lifetimes at ``rate``
    (a shorter run never fills the pipeline and flatters every config), within [low, high].

    The lifetime is the idle TTFT plus the idle decode time, doubled for load.
    """
    probe = DeployConfig("aggregated", 1, 1, 1, encode_batch=1)
    ttft = float(np.mean(unloaded_ttft(profile, probe, workload)))
    tpot = unloaded_tpot(profile, probe, workload)
    steps = np.array([max(r.output_tokens - 1, 0) for r in workload.requests])
    life = 2.0 * (ttft + float(np.mean(tpot * steps)))
    return int(min(max(math.ceil(6 * rate * life), low), high))
