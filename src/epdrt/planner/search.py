# SPDX-License-Identifier: Apache-2.0
"""Config search: which mode, how many GPUs per pool, which batch limits and image split.

Objectives:

- ``rate`` given: the fewest GPUs whose SLO attainment at that rate reaches the target;
  ties broken by goodput per GPU.
- no ``rate``: the highest goodput per GPU within the GPU budget.

Goodput is the highest request rate at which at least ``slo.target`` of requests meet both
SLOs, found by bisection on the rate (one request list rescaled to each rate, so attainment
falls almost monotonically with rate).

How the search stays fast (seconds for 64 GPUs):

1. Closed-form pruning (capacity.py): a batch-limit combination is dropped when it cannot hold
   the workload in memory or misses the SLOs even on an idle system; per-pool GPU counts
   start at the fewest that keep the pool below ~85% utilization (never below the count that
   keeps it below 100%, a hard bound) and decode at the count whose mean-field batch meets
   the TPOT SLO.
2. Only the most promising ``combos_per_mode`` combinations of each mode are simulated.
3. Simulation refines the counts: add a GPU to the pool that limits attainment until the
   target is met, then take GPUs away while it still is. A combination whose lower bound on
   GPUs exceeds the best found for its mode is skipped (branch and bound).
4. Simulations stop as soon as the target can no longer be met.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from epdrt.errors import InvalidArgument
from epdrt.planner.capacity import (
    StageWork,
    WorkloadStats,
    balanced_pools,
    capacity_rps,
    min_pools,
    stage_work,
    unloaded_tpot,
    unloaded_ttft,
)
from epdrt.planner.config import MODES, POOLS, DeployConfig, check_memory
from epdrt.planner.metrics import SLO
from epdrt.planner.profile import StageProfile
from epdrt.planner.simulator import SimResult, simulate
from epdrt.planner.workload import Request, Workload

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SearchSpace:
    """The knobs the search tries. Counts per pool are searched, not listed."""

    modes: tuple[str, ...] = MODES
    encode_batch: tuple[int, ...] = (4, 8, 16, 32)
    prefill_tokens: tuple[int, ...] = (2048, 4096, 8192, 16384)
    decode_batch: tuple[int, ...] = (32, 64, 128, 256)
    image_split: tuple[int, ...] = (1, 2, 4)
    combos_per_mode: int = 4  # batch-limit combinations per mode refined by simulation

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise InvalidArgument(f"unknown modes {bad}; choose from {MODES}")


@dataclass
class Evaluation:
    """One config simulated at one rate (and, for ranked rows, its goodput)."""

    config: DeployConfig
    rate: float
    attainment: float
    aborted: bool
    ttft_p90_s: float
    tpot_p90_s: float
    throughput_rps: float
    capacity_rps: float
    goodput_rps: float | None = None

    @property
    def goodput_per_gpu(self) -> float | None:
        return None if self.goodput_rps is None else self.goodput_rps / self.config.num_gpus

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "label": self.config.label(),
            "rate": self.rate,
            "slo_attainment": self.attainment,
            "attainment_is_upper_bound": self.aborted,
            "ttft_p90_s": self.ttft_p90_s,
            "tpot_p90_s": self.tpot_p90_s,
            "throughput_rps": self.throughput_rps,
            "capacity_bound_rps": self.capacity_rps,
            "goodput_rps": self.goodput_rps,
            "goodput_per_gpu": self.goodput_per_gpu,
        }


@dataclass
class PlanResult:
    """The search's answer: ranked configs, each mode's best, a one-paragraph verdict."""

    objective: str
    rate: float | None
    slo: SLO
    max_gpus: int
    ranked: list[Evaluation]
    best_by_mode: dict[str, Evaluation | None]
    recommendation: str
    num_simulations: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "rate": self.rate,
            "slo": {
                "ttft_s": self.slo.ttft_s,
                "tpot_s": self.slo.tpot_s,
                "target": self.slo.target,
            },
            "max_gpus": self.max_gpus,
            "recommendation": self.recommendation,
            "ranked": [e.to_dict() for e in self.ranked],
            "best_by_mode": {
                m: (e.to_dict() if e is not None else None) for m, e in self.best_by_mode.items()
            },
            "num_simulations": self.num_simulations,
            "elapsed_s": self.elapsed_s,
            "notes": self.notes,
        }


class Evaluator:
    """Simulates configs on one workload and SLO, caching results by (config, rate)."""

    def __init__(
        self,
        profile: StageProfile,
        workload: Workload,
        slo: SLO,
        progress: Progress | None = None,
    ) -> None:
        self.profile = profile
        self.workload = workload
        self.slo = slo
        self.stats = WorkloadStats.of(workload)
        self.progress = progress
        self.num_simulations = 0
        self._results: dict[tuple[DeployConfig, float, bool], SimResult] = {}
        self._requests: OrderedDict[float, list[Request]] = OrderedDict()
        self._work: dict[DeployConfig, StageWork] = {}

    def requests(self, rate: float) -> list[Request]:
        reqs = self._requests.get(rate)
        if reqs is None:
            reqs = self._requests[rate] = self.workload.at_rate(rate)
            if len(self._requests) > 16:
                self._requests.popitem(last=False)
        return reqs

    def work(self, config: DeployConfig) -> StageWork:
        key = replace(config, num_encode=1, num_prefill=1, num_decode=1, image_split=1)
        w = self._work.get(key)
        if w is None:
            w = self._work[key] = stage_work(self.profile, config, self.stats)
        return w

    def capacity(self, config: DeployConfig) -> float:
        return capacity_rps(config, self.work(config))

    def memory_problem(self, config: DeployConfig) -> str | None:
        s = self.stats
        return check_memory(
            self.profile, config, s.max_image_tokens, s.max_request_tokens, s.max_input_tokens
        )

    def simulate(self, config: DeployConfig, rate: float, early_stop: bool = True) -> SimResult:
        key = (config, rate, early_stop)
        res = self._results.get(key) or self._results.get((config, rate, False))
        if res is None:
            res = simulate(
                self.profile,
                config,
                self.requests(rate),
                self.slo,
                stop_below=self.slo.target if early_stop else None,
            )
            self._results[key] = res
            self.num_simulations += 1
            if self.progress and self.num_simulations % 25 == 0:
                self.progress(f"{self.num_simulations} simulations")
        return res

    def evaluate(self, config: DeployConfig, rate: float) -> Evaluation:
        res = self.simulate(config, rate)
        return Evaluation(
            config=config,
            rate=rate,
            attainment=res.slo_attainment,
            aborted=res.aborted,
            ttft_p90_s=res.ttft_quantile(0.9),
            tpot_p90_s=res.tpot_quantile(0.9),
            throughput_rps=res.throughput_rps,
            capacity_rps=self.capacity(config),
        )

    def meets(self, config: DeployConfig, rate: float) -> bool:
        return self.simulate(config, rate).slo_attainment >= self.slo.target

    def goodput(
        self, config: DeployConfig, rel_tol: float = 0.03, known_ok: float | None = None
    ) -> float:
        """Highest rate (requests/s) with attainment >= target, to ``rel_tol``; 0 when even
        a rate of 2% of the capacity bound misses it.

        Args:
            known_ok: a rate already known to meet the target (narrows the bisection).
        """
        cap = self.capacity(config)
        hi = cap * 1.05 if math.isfinite(cap) else 1.0
        if known_ok is not None and known_ok < hi:
            lo = known_ok
        else:
            lo = hi * 0.02
            if not self.meets(config, lo):
                return 0.0
        for _ in range(8):
            if not self.meets(config, hi):
                break
            lo, hi = hi, hi * 1.5
        else:
            return lo
        while hi - lo > rel_tol * hi:
            mid = (lo + hi) / 2
            if self.meets(config, mid):
                lo = mid
            else:
                hi = mid
        return lo


def goodput(
    profile: StageProfile,
    config: DeployConfig,
    workload: Workload,
    slo: SLO,
    rel_tol: float = 0.03,
) -> float:
    """Highest request rate (requests/s) at which ``slo.target`` of requests meet both SLOs."""
    return Evaluator(profile, workload, slo).goodput(config, rel_tol)


# -- the search ----------------------------------------------------------------------------


@dataclass
class _Combo:
    """A mode with batch limits and split, before its GPU counts are settled."""

    base: DeployConfig  # counts of 1 per pool
    lower: tuple[int, ...]  # hard lower bound on each pool's GPUs
    start: tuple[int, ...]  # where the simulated refinement starts
    score: float  # estimated latency / SLO (lower is better)


def _limits(c: DeployConfig) -> dict[str, int]:
    return {
        "encode_batch": c.encode_batch,
        "prefill_tokens": c.prefill_tokens,
        "decode_batch": c.decode_batch,
        "image_split": c.image_split,
    }


def _with_pools(c: DeployConfig, pools: tuple[int, ...]) -> DeployConfig:
    return DeployConfig.from_pools(c.mode, pools, **_limits(c))


def _base_configs(space: SearchSpace, stats: WorkloadStats) -> list[DeployConfig]:
    max_images = int(stats.num_images.max()) if len(stats.num_images) else 0
    has_images = max_images > 0
    out = []
    for mode in space.modes:
        splits = space.image_split if mode in ("epd", "ed") and has_images else (1,)
        ebs = space.encode_batch if has_images else (max(space.encode_batch),)
        for eb in ebs:
            for pt in space.prefill_tokens:
                for db in space.decode_batch:
                    for k in splits:
                        if k > 1 and k > max_images:
                            continue
                        pools = {"epd": (k, 1, 1), "pd": (1, 1), "ed": (1, k)}.get(mode, (1,))
                        out.append(
                            DeployConfig.from_pools(
                                mode,
                                pools,
                                encode_batch=eb,
                                prefill_tokens=pt,
                                decode_batch=db,
                                image_split=k,
                            )
                        )
    return out


def _decode_start(
    ev: Evaluator, config: DeployConfig, rate: float, lower: int, limit: int
) -> tuple[int, float]:
    """Fewest decode-pool GPUs whose mean-field decode batch keeps TPOT within 90% of the SLO,
    and that TPOT estimate (seconds; inf when none within ``limit``).

    Mean field (Little's law): a decode GPU receiving ``rate / n`` requests per second holds
    ``B = rate / n * steps * step(B)`` sequences on average, ``step(B) = decode(B, B * ctx)``.
    """
    s = ev.stats
    steps = float(np.maximum(s.output_tokens - 1, 0).mean())
    if steps == 0:
        return lower, 0.0
    out = s.output_tokens
    w = np.maximum(out - 1, 0)
    ctx = float(((s.input_tokens + (out + 1) / 2) * w).sum() / max(w.sum(), 1))
    cap = ev.work(config).decode_batch
    step_s = ev.profile.overheads.step_s

    def dec(batch: float, context: float) -> float:
        return ev.profile.decode(batch, context) + step_s

    for n in range(lower, limit + 1):
        lam = rate / n
        b = 1.0
        for _ in range(60):
            nb = max(1.0, lam * steps * dec(b, b * ctx))
            if abs(nb - b) < 1e-3 * b or nb > cap:
                b = nb
                break
            b = nb
        tpot = dec(b, b * ctx)
        if b <= cap and tpot <= 0.9 * ev.slo.tpot_s:
            return n, tpot
    return max(limit, lower), math.inf


def _combos(
    ev: Evaluator, space: SearchSpace, rate: float, max_gpus: int, notes: list[str]
) -> dict[str, list[_Combo]]:
    """Per mode, the batch-limit combinations worth simulating, most promising first."""
    slo = ev.slo
    by_mode: dict[str, list[_Combo]] = {m: [] for m in space.modes}
    ttft_cache: dict[tuple[bool, int, int], np.ndarray] = {}
    tpot_cache: dict[bool, np.ndarray] = {}
    dropped: dict[str, int] = {}
    for base in _base_configs(space, ev.stats):
        if ev.memory_problem(base):
            dropped["memory"] = dropped.get("memory", 0) + 1
            continue
        colocated = base.mode in ("pd", "aggregated")
        tk = (colocated, base.image_split, base.encode_batch)
        if tk not in ttft_cache:
            ttft_cache[tk] = unloaded_ttft(ev.profile, base, ev.workload)
        agg = base.mode == "aggregated"
        if agg not in tpot_cache:
            tpot_cache[agg] = unloaded_tpot(ev.profile, base, ev.workload)
        ttft0, tpot0 = ttft_cache[tk], tpot_cache[agg]
        if float(np.mean((ttft0 <= slo.ttft_s) & (tpot0 <= slo.tpot_s))) < slo.target:
            dropped["latency"] = dropped.get("latency", 0) + 1
            continue
        work = ev.work(base)
        lower = tuple(max(a, b) for a, b in zip(min_pools(base, work, rate, 1.0), base.pools))
        start = [max(a, b) for a, b in zip(min_pools(base, work, rate, 0.85), lower)]
        pools = POOLS[base.mode]
        tpot_est = float(np.quantile(tpot0, slo.target))
        if "D" in pools:
            i = pools.index("D")
            start[i], tpot_est = _decode_start(ev, base, rate, start[i], max_gpus)
        if sum(lower) > max_gpus:
            dropped["budget"] = dropped.get("budget", 0) + 1
            continue
        # Latency score: idle TTFT plus one full prefill batch ahead, and the mean-field TPOT.
        ttft_est = float(np.quantile(ttft0, slo.target)) + ev.profile.prefill(
            min(base.prefill_tokens, int(ev.stats.input_tokens.max()))
        )
        score = max(ttft_est / slo.ttft_s, tpot_est / slo.tpot_s)
        by_mode[base.mode].append(_Combo(base, tuple(lower), tuple(start), score))
    for mode, combos in by_mode.items():
        combos.sort(key=lambda c: (sum(c.start), round(c.score, 2), sum(c.lower)))
        by_mode[mode] = combos[: space.combos_per_mode]
    if dropped:
        notes.append(
            "batch-limit combinations pruned without simulating: "
            + ", ".join(f"{n} by {why}" for why, n in sorted(dropped.items()))
        )
    return by_mode


def _bottleneck(ev: Evaluator, res: SimResult) -> int:
    """Index of the pool to grow: the one behind most SLO misses."""
    mode = res.config.mode
    pools = POOLS[mode]
    if len(pools) == 1:
        return 0
    slo = ev.slo
    with np.errstate(invalid="ignore"):
        ttft_bad = float(np.mean(~(res.ttft_s <= slo.ttft_s)))
        tpot_bad = float(np.mean(~(res.tpot_s <= slo.tpot_s)))
    if tpot_bad > ttft_bad:
        return pools.index("D")
    u = res.utilization
    if mode == "epd":
        return pools.index("E") if u.get("encode", 0) > u.get("prefill", 0) else pools.index("P")
    if mode == "ed":
        busy_d = u.get("encode", 0) + u.get("decode", 0)
        return pools.index("D") if busy_d > u.get("prefill", 0) else pools.index("P")
    return pools.index("P")  # pd: encode and prefill share the P pool


def _refine(
    ev: Evaluator, combo: _Combo, rate: float, limit: int, seen: list[Evaluation]
) -> Evaluation | None:
    """The fewest-GPU counts (within ``limit``) at which ``combo`` meets the target."""
    target = ev.slo.target
    pools = list(combo.start)
    # A start above the limit gives back its headroom, pool by pool, down to the hard bounds.
    while sum(pools) > limit and any(p > lo for p, lo in zip(pools, combo.lower)):
        i = max(range(len(pools)), key=lambda j: (pools[j] - combo.lower[j]) / pools[j])
        pools[i] -= 1
    best: Evaluation | None = None
    last, stall = -1.0, 0
    while sum(pools) <= limit:
        e = ev.evaluate(_with_pools(combo.base, tuple(pools)), rate)
        seen.append(e)
        if e.attainment >= target:
            best = e
            break
        stall = stall + 1 if e.attainment <= last + 0.002 else 0
        if stall >= 3:
            return None
        last = e.attainment
        pools[_bottleneck(ev, ev.simulate(e.config, rate))] += 1
    if best is None:
        return None
    shrinking = True
    while shrinking:
        shrinking = False
        res = ev.simulate(best.config, rate)
        stages = {"E": "encode", "P": "prefill", "D": "decode", "N": "decode"}
        order = sorted(
            range(len(pools)),
            key=lambda i: res.utilization.get(stages[POOLS[best.config.mode][i]], 0.0),
        )
        for i in order:
            if pools[i] <= combo.lower[i]:
                continue
            trial = pools.copy()
            trial[i] -= 1
            e = ev.evaluate(_with_pools(combo.base, tuple(trial)), rate)
            seen.append(e)
            if e.attainment >= target:
                pools, best, shrinking = trial, e, True
                break
    return best


def _distinct(evals: Any) -> list[Evaluation]:
    """Evaluations sorted by (GPUs, -attainment, batch limits), dropping configs that behaved
    exactly like an earlier one (same mode and pools, identical results: the limits that
    differ never bound)."""
    out: list[Evaluation] = []
    keys: set[tuple[Any, ...]] = set()
    order = sorted(
        evals,
        key=lambda e: (
            e.config.num_gpus,
            -e.attainment,
            e.config.decode_batch,
            e.config.prefill_tokens,
            e.config.encode_batch,
            e.config.image_split,
        ),
    )
    for e in order:
        k = (e.config.mode, e.config.pools, e.attainment, e.ttft_p90_s, e.tpot_p90_s)
        if k not in keys:
            keys.add(k)
            out.append(e)
    return out


def _rank_key_rate(e: Evaluation, target: float) -> tuple[float, ...]:
    return (
        0.0 if e.attainment >= target else 1.0,
        e.config.num_gpus,
        -(e.goodput_per_gpu or 0.0),
        -e.attainment,
    )


def _verdict(
    best: Evaluation | None, by_mode: dict[str, Evaluation | None], objective: str, target: float
) -> str:
    if best is None:
        return "no config in the search space meets the SLO target within the GPU budget"

    def desc(e: Evaluation) -> str:
        g = f"{e.goodput_rps:.2f} req/s goodput" if e.goodput_rps is not None else ""
        return f"{e.config.label()} ({e.config.num_gpus} GPUs{', ' + g if g else ''})"

    mode = best.config.mode
    where = {
        "epd": "with a separate encode pool",
        "pd": "without a separate encode pool: encode on the prefill GPUs",
        "ed": "without a separate encode pool: encode on the decode GPUs",
        "aggregated": "without disaggregation (no separate encode pool): every GPU runs "
        "encode, prefill and decode",
    }[mode]
    text = f"best: {mode} {where}: {desc(best)}."
    others = []
    for m, e in by_mode.items():
        if m == mode:
            continue
        if e is None or (objective == "min-gpus" and e.attainment < target):
            others.append(f"{m}: no config meets the target")
        else:
            others.append(f"{m}: {desc(e)}")
    if others:
        text += " Best of the others: " + "; ".join(others) + "."
    return text


def search(
    profile: StageProfile,
    workload: Workload,
    slo: SLO,
    max_gpus: int,
    rate: float | None = None,
    space: SearchSpace | None = None,
    top: int = 6,
    progress: Progress | None = None,
) -> PlanResult:
    """Searches configs within ``max_gpus`` GPUs.

    Args:
        rate: requests per second to serve with the fewest GPUs; None maximizes goodput per
            GPU instead.
        top: ranked rows to return (each mode's best is always among them).
        progress: called with a short message now and then (the CLI prints it to stderr).
    """
    if max_gpus < 1:
        raise InvalidArgument("max_gpus must be >= 1")
    space = space or SearchSpace()
    t0 = time.perf_counter()
    ev = Evaluator(profile, workload, slo, progress)
    notes: list[str] = []
    if rate is not None:
        ranked, by_mode = _search_rate(ev, space, rate, max_gpus, top, notes, progress)
        objective = "min-gpus"
    else:
        ranked, by_mode = _search_goodput(ev, space, max_gpus, top, notes, progress)
        objective = "goodput-per-gpu"
    best = ranked[0] if ranked and (rate is None or ranked[0].attainment >= slo.target) else None
    if rate is None and best is not None and not best.goodput_rps:
        best = None
    return PlanResult(
        objective=objective,
        rate=rate,
        slo=slo,
        max_gpus=max_gpus,
        ranked=ranked,
        best_by_mode=by_mode,
        recommendation=_verdict(best, by_mode, objective, slo.target),
        num_simulations=ev.num_simulations,
        elapsed_s=time.perf_counter() - t0,
        notes=notes,
    )


def _search_rate(
    ev: Evaluator,
    space: SearchSpace,
    rate: float,
    max_gpus: int,
    top: int,
    notes: list[str],
    progress: Progress | None,
) -> tuple[list[Evaluation], dict[str, Evaluation | None]]:
    target = ev.slo.target
    combos = _combos(ev, space, rate, max_gpus, notes)
    seen: list[Evaluation] = []
    found: dict[str, list[Evaluation]] = {m: [] for m in space.modes}
    for mode, cs in combos.items():
        best_g = max_gpus
        for c in cs:
            if sum(c.lower) > best_g:
                continue
            e = _refine(ev, c, rate, best_g, seen)
            if e is not None:
                found[mode].append(e)
                best_g = min(best_g, e.config.num_gpus)
        if progress:
            g = min((e.config.num_gpus for e in found[mode]), default=None)
            progress(
                f"{mode}: {len(cs)} combos refined, "
                + (f"fewest GPUs {g}" if g else "none meets the target")
            )
    # Goodput for the rows worth showing: each mode's fewest-GPU configs, then the rest.
    meeting = {id(e): e for m in found for e in found[m]}
    for e in seen:
        if e.attainment >= target:
            meeting.setdefault(id(e), e)
    cands = _distinct(meeting.values())
    by_mode: dict[str, Evaluation | None] = {}
    chosen: list[Evaluation] = []
    for mode in space.modes:
        mine = [e for e in cands if e.config.mode == mode]
        if mine:
            g = mine[0].config.num_gpus
            chosen.extend([e for e in mine if e.config.num_gpus == g][:1])
    chosen.extend(e for e in cands[:top] if e not in chosen)
    for e in chosen:
        e.goodput_rps = ev.goodput(e.config, known_ok=rate)
    for mode in space.modes:
        mine = sorted(
            (e for e in chosen if e.config.mode == mode), key=lambda e: _rank_key_rate(e, target)
        )
        if mine:
            by_mode[mode] = mine[0]
        else:
            tried = [e for e in seen if e.config.mode == mode]
            by_mode[mode] = max(tried, key=lambda e: e.attainment) if tried else None
    ranked = sorted(chosen, key=lambda e: _rank_key_rate(e, target))
    rows = ranked[:top]
    for e in by_mode.values():
        if e is not None and e not in rows:
            rows.append(e)
    if not chosen:
        rows = sorted(seen, key=lambda e: -e.attainment)[:top]
    return rows, by_mode


def _search_goodput(
    ev: Evaluator,
    space: SearchSpace,
    max_gpus: int,
    top: int,
    notes: list[str],
    progress: Progress | None,
) -> tuple[list[Evaluation], dict[str, Evaluation | None]]:
    slo = ev.slo
    cands: list[tuple[float, float, int, DeployConfig]] = []
    dropped = 0
    ttft_cache: dict[tuple[bool, int, int], np.ndarray] = {}
    tpot_cache: dict[bool, np.ndarray] = {}
    for base in _base_configs(space, ev.stats):
        if ev.memory_problem(base):
            dropped += 1
            continue
        tk = (base.mode in ("pd", "aggregated"), base.image_split, base.encode_batch)
        if tk not in ttft_cache:
            ttft_cache[tk] = unloaded_ttft(ev.profile, base, ev.workload)
        agg = base.mode == "aggregated"
        if agg not in tpot_cache:
            tpot_cache[agg] = unloaded_tpot(ev.profile, base, ev.workload)
        ok = (ttft_cache[tk] <= slo.ttft_s) & (tpot_cache[agg] <= slo.tpot_s)
        if float(np.mean(ok)) < slo.target:
            dropped += 1
            continue
        work = ev.work(base)
        # Latency score: idle TTFT plus one full prefill batch ahead, and TPOT at the largest
        # decode batch the limits allow, against the SLOs (lower is better).
        s_ = ev.stats
        ctx = float((s_.input_tokens + s_.output_tokens / 2).mean())
        b = work.decode_batch
        score = max(
            (float(np.quantile(ttft_cache[tk], slo.target))
             + ev.profile.prefill(min(base.prefill_tokens, int(s_.input_tokens.max()))))
            / slo.ttft_s,
            (ev.profile.decode(b, b * ctx) + ev.profile.overheads.step_s) / slo.tpot_s,
        )  # fmt: skip
        n_min = sum(base.pools)
        for g in range(n_min, max_gpus + 1):
            pools = balanced_pools(base, work, g)
            if base.mode == "ed" and pools[1] < base.image_split:
                continue
            if base.mode == "epd" and pools[0] < base.image_split:
                continue
            cfg = _with_pools(base, pools)
            cands.append((capacity_rps(cfg, work) / g, score, g, cfg))
    if dropped:
        notes.append(f"{dropped} batch-limit combinations pruned without simulating")
    # Upper bound on goodput per GPU first (in 5% steps), then the latency score, then the
    # largest deployment (more GPUs multiplex bursts better at the same bound).
    top_bound = max((c[0] for c in cands), default=1.0)
    cands.sort(key=lambda c: (-math.floor(20 * c[0] / top_bound), c[1], -c[2]))
    evaluated: list[Evaluation] = []
    per_mode_budget = {m: space.combos_per_mode + 1 for m in space.modes}
    best_by_mode: dict[str, float] = {}
    shapes: set[tuple[str, tuple[int, ...]]] = set()
    for bound, _, _, cfg in cands:
        mode = cfg.mode
        if per_mode_budget[mode] <= 0 or bound <= best_by_mode.get(mode, 0.0):
            continue
        # One evaluation per pool shape: the counts matter more than the batch limits, which
        # the latency score already picked for this shape.
        if (mode, cfg.pools) in shapes:
            continue
        shapes.add((mode, cfg.pools))
        per_mode_budget[mode] -= 1
        gp = ev.goodput(cfg)
        e = ev.evaluate(cfg, gp if gp > 0 else bound * cfg.num_gpus * 0.02)
        e.goodput_rps = gp
        evaluated.append(e)
        best_by_mode[mode] = max(best_by_mode.get(mode, 0.0), gp / cfg.num_gpus)
        if all(v <= 0 for v in per_mode_budget.values()):
            break
    if progress:
        progress(f"{len(evaluated)} configs evaluated by goodput bisection")
    distinct: dict[tuple[Any, ...], Evaluation] = {}
    for e in evaluated:
        key = (e.config.mode, e.config.pools, e.goodput_rps, e.ttft_p90_s, e.tpot_p90_s)
        distinct.setdefault(key, e)
    ranked = sorted(distinct.values(), key=lambda e: -(e.goodput_per_gpu or 0.0))
    by_mode: dict[str, Evaluation | None] = {m: None for m in space.modes}
    for e in ranked:
        if by_mode[e.config.mode] is None:
            by_mode[e.config.mode] = e
    rows = ranked[:top]
    for e in by_mode.values():
        if e is not None and e not in rows:
            rows.append(e)
    return rows, by_mode


def attainment_curve(
    ev: Evaluator, config: DeployConfig, rates: list[float]
) -> list[tuple[float, float, float]]:
    """(rate, SLO attainment, good requests per second) at each rate, full simulations."""
    out = []
    for r in rates:
        res = ev.simulate(config, r, early_stop=False)
        good = float(np.sum(ev.slo.met(res.ttft_s, res.tpot_s)))
        out.append((r, res.slo_attainment, good / res.duration_s if res.duration_s > 0 else 0.0))
    return out


def curves(
    profile: StageProfile,
    workload: Workload,
    slo: SLO,
    configs: list[DeployConfig],
    rates: list[float],
) -> dict[str, list[tuple[float, float, float]]]:
    """Per config label: (rate, SLO attainment, good requests/s) at each rate."""
    ev = Evaluator(profile, workload, slo)
    return {c.label(): attainment_curve(ev, c, rates) for c in configs}


def curve_configs(plan: PlanResult, num_top: int = 3) -> list[DeployConfig]:
    """The configs worth plotting: the top ranked ones and each mode's best."""
    out: list[DeployConfig] = []
    for e in plan.ranked[:num_top]:
        if e.config not in out:
            out.append(e.config)
    for e in plan.best_by_mode.values():
        if e is not None and e.config not in out:
            out.append(e.config)
    return out
