# SPDX-License-Identifier: Apache-2.0
"""The planner's simulator against real runs: predicted against measured TTFT, TPOT and
throughput of the same deployments serving the same requests on this host.

1. Profile the model on this device (what ``epdrt profile`` measures; or ``--profile``).
2. Calibrate what the profile cannot measure in isolation: ``Overheads.request_s`` (the
   router's routing, dispatching and first-token bookkeeping) with its spread from request to
   request, and ``Overheads.step_s`` (the worker's loop around each decode step): isolated
   requests through an idle ``aggregated`` deployment, the medians (and quantiles) of
   measured minus simulated TTFT and TPOT (``--no-calibrate`` skips it). The other
   deployments and every load effect are then predicted, not fitted.
3. For each deployment (default: ``epd`` 1E1P1D, ``pd`` 1P1D, ``aggregated`` 1 worker): launch
   it, send a few warm-up requests, then replay a Poisson workload at each of ``--rates`` and
   keep each request's submit time, shape (MM tokens per image, text tokens, tokens generated)
   and timings. A rate beyond the deployment's capacity measures its throughput.
4. Replay the same requests (same submit times, same shapes) in the simulator with the profile;
   on a CPU-only host the workers and the router share the host's cores in the simulation
   (each worker on a core of its own when the runtime pins them),
   the profile's batch latencies are scaled to the host's speed during the run (a probe of
   the model's own batches, timed beside the profile and again before and after each
   workload), and processes computing at the same time slow each other by the fraction a
   second copy of the probe causes (``SpeedProbe``; ``--no-host-probes`` skips both).
5. One record per (deployment, metric): ``value`` = predicted, ``baseline_value`` = measured,
   ``ratio = min / max`` (1.0 = exact); ``extra`` holds the error, the speed ratio, the
   interference, and what the prediction is without each of: the calibration, the speed
   probe, the interference, the calibrated request spread, shared cores, pinning, jitter.

Without ``--model`` a random-weight LLaVA of ``--size`` is made: ``small`` (default), whose
batches take milliseconds to tens of milliseconds on one CPU core, so that compute rather than
the runtime's millisecond-scale overheads sets its latencies; ``tiny`` for a quick check. The
default rates are a moderate load and one far past every deployment's capacity (it measures
the capacity). Throughput is completed requests per second from the first submit to the
last token, on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from epdrt.bench._speed_probe import SpeedProbe
from epdrt.bench.transfer import link_for_profile
from epdrt.benchmarking import Record, model_dir_or_tiny, process_cpu_seconds

HELP = "planner simulator vs real epd/pd/aggregated runs: TTFT p50/p90, TPOT, throughput"

# The runtime's deployments: mode:encoders:prefill (pd: E+P; aggregated: all) workers:decoders.
DEFAULT_DEPLOYMENTS = "epd:1:1:1,pd:0:1:1,aggregated:0:1:0"
QUANTILES = [i / 20 for i in range(21)]
METRICS = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "throughput_rps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: a fresh LLaVA of --size)")
    parser.add_argument(
        "--size", default="small", choices=("small", "tiny"), help="LLaVA made without --model"
    )
    parser.add_argument("--profile", help="use this profile JSON instead of measuring one")
    parser.add_argument("--save-profile", help="write the profile used (calibrated) here")
    parser.add_argument("--quick-profile", action="store_true", help="fewer profile shapes")
    parser.add_argument(
        "--transfer", help="'epdrt bench transfer' JSON lines for the link cost (default: run it)"
    )
    parser.add_argument(
        "--no-calibrate", action="store_true", help="keep the profile's request_s and step_s"
    )
    parser.add_argument(
        "--no-host-probes",
        action="store_true",
        help="on a CPU host, neither rescale the profile to the host's speed at each run nor "
        "measure how much concurrent workers slow each other (see SpeedProbe)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="weights, KV and MM tokens of the profile and of every run (default: bfloat16 on "
        "a GPU, float32 on CPU)",
    )
    parser.add_argument("--calibration-requests", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200, help="requests per deployment")
    parser.add_argument("--rates", default="6,60", help="Poisson arrivals per second, one run each")
    parser.add_argument("--images", default="1,4", help="min,max images per request")
    parser.add_argument("--max-new-tokens", default="4,16", help="min,max tokens to generate")
    parser.add_argument(
        "--deployments",
        default=DEFAULT_DEPLOYMENTS,
        help="mode:E:P:D,... (pd: P = E+P workers; aggregated: P = workers)",
    )
    parser.add_argument(
        "--warmup", type=int, default=6, help="untimed requests first, one at a time"
    )
    parser.add_argument(
        "--warmup-burst",
        type=int,
        default=48,
        help="then this many untimed requests of the most images and tokens, all at once, so "
        "that every worker has run its largest batches before the timed runs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="whole measurements (profile, calibration, runs)"
    )
    parser.add_argument(
        "--host-cores",
        type=int,
        help="CPU cores the workers and router share in the simulation (default: this host's "
        "on a CPU-only host; none with GPUs)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds before a request fails"
    )
    parser.add_argument(
        "--attempts", type=int, default=3, help="launches per deployment when requests fail"
    )
    parser.add_argument(
        "--save-runs",
        help="directory for one JSONL per deployment: each request, measured and simulated",
    )


def _say(msg: str) -> None:
    print(f"[bench planner] {msg}", file=sys.stderr, flush=True)


def _deployments(text: str) -> list[tuple[str, int, int, int]]:
    out = []
    for item in text.split(","):
        mode, e, p, d = item.strip().split(":")
        out.append((mode, int(e), int(p), int(d)))
    return out


# A table row: deployment@rate, predicted and measured metrics, CPU per process (_cpu_table).
_Row = tuple[str, dict[str, float], dict[str, float], dict[str, dict[str, Any]]]


@dataclass
class Usage:
    """What serving one workload used: the CPU seconds of each process (by worker name; this
    process, the router, as ``router``) and the tokens messages the router took in."""

    cpu_s: dict[str, float]
    tokens_messages: int


def _run_real(
    model_dir: str,
    config: Any,
    workloads: list[list[Any]],
    warmup: list[Any],
    burst: list[Any],
    probe: Callable[[], float] | None = None,
) -> tuple[list[list[Any]], list[float], list[Usage]]:
    """Serves each workload in turn (a second apart) on one fresh deployment, after the
    ``warmup`` requests one at a time and then the ``burst`` all at once (untimed); returns the
    Observed requests of each, with ``probe`` its value before each workload and after the
    last (the workers idle meanwhile), and what each workload used (Usage)."""
    from epdrt.planner.validation import Observed
    from epdrt.runtime.cluster import EPDCluster

    out: list[list[Any]] = []
    probes: list[float] = []
    usage: list[Usage] = []
    with EPDCluster.launch(model_dir, config) as cluster:
        pids = {**cluster.worker_pids(), "router": os.getpid()}
        # One at a time: first calls in every worker. Then the burst all at once: every worker
        # reaches its largest batches before anything is timed (a CPU worker's heap grows to
        # its high-water mark once, a page fault per new page).
        warmed = [cluster.submit(it.request).result() for it in warmup]
        warmed += [f.result() for f in [cluster.submit(it.request) for it in burst]]
        for res in warmed:
            if res.error:
                raise RuntimeError(f"warm-up request failed: {res.error}")
        for workload in workloads:
            shapes = {}
            for item in workload:
                prep = cluster.pre.prepare(item.request)
                tokens = tuple(im.num_tokens for im in prep.images)
                shapes[item.request.id] = (tokens, len(prep.input_ids) - sum(tokens))
            if probe is not None:
                probes.append(probe())
            time.sleep(1.0)
            cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
            tokens_before = cluster.messages_received().get("Tokens", 0)
            start = time.monotonic()
            futures, submits = [], []
            for item in workload:
                delay = start + item.arrival_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                submits.append(time.monotonic() - start)
                futures.append(cluster.submit(item.request))
            results = [f.result() for f in futures]
            usage.append(
                Usage(
                    {n: process_cpu_seconds(pid) - cpu_before[n] for n, pid in pids.items()},
                    cluster.messages_received().get("Tokens", 0) - tokens_before,
                )
            )
            observed = []
            for t, r in zip(submits, results):
                if r.error is not None or r.ttft_s is None or r.e2e_s is None:
                    raise RuntimeError(f"request {r.id} failed: {r.error}")
                tokens, prompt = shapes[r.id]
                shape = (tokens, prompt, len(r.token_ids))
                times = (r.ttft_s, r.tpot_s, r.e2e_s, r.encode_s)
                observed.append(Observed(r.id, t, *shape, *times))
            out.append(observed)
        if probe is not None:
            probes.append(probe())
    return out, probes, usage


def _serve(
    model_dir: str,
    config: Any,
    works: list[list[Any]],
    warm: list[Any],
    burst: list[Any],
    attempts: int,
    probe: SpeedProbe | None = None,
) -> tuple[list[list[Any]], list[float], list[Usage], int]:
    """_run_real, relaunching the deployment when a request fails; (observed, the host speed
    ratio during each workload (1.0 without a probe), usage, launches)."""
    from epdrt.errors import EpdrtError

    for attempt in range(1, attempts + 1):
        try:
            runs, probes, usage = _run_real(
                model_dir, config, works, warm, burst, probe.seconds if probe else None
            )
        except (RuntimeError, EpdrtError) as exc:
            # NOTE: now and then a request in a fresh epd deployment never gets its first
            # token (no worker error, nothing in the logs): relaunch rather than give up.
            _say(f"{config.mode}: launch {attempt} failed: {exc}")
            if attempt == attempts:
                raise
            continue
        ratios = [probe.ratio(probes[k : k + 2]) if probe else 1.0 for k in range(len(runs))]
        return runs, ratios, usage, attempt
    raise AssertionError("unreachable")


def _runtime_label(config: Any) -> str:
    """``epd E1 P1 D1``, ``pd P1 D1`` (E+P workers, decoders) or ``aggregated N1``."""
    if config.mode == "epd":
        return f"epd E{config.num_encode} P{config.num_prefill} D{config.num_decode}"
    if config.mode == "pd":
        return f"pd P{config.num_prefill} D{config.num_decode}"
    return f"aggregated N{config.num_prefill}"


@dataclass
class RouterPhase:
    """The router's CPU over one calibration workload: requests served, tokens messages taken
    in (one per first token, one per decode step), its CPU seconds, and the part of them the
    profile's preprocessing accounts for."""

    requests: int
    tokens_messages: int
    cpu_s: float
    prepare_s: float


def router_costs(phases: list[RouterPhase]) -> tuple[float, float]:
    """(``route_s``, ``token_message_s``): the router's CPU per request beyond preprocessing
    (its first-token message included) and per tokens message of a decode step, fitted to
    ``cpu_s - prepare_s = requests * route_s + steps * token_message_s`` over the phases
    (steps = tokens messages - requests): least squares, both at least 0."""
    a = np.array([[p.requests, p.tokens_messages - p.requests] for p in phases], dtype=float)
    b = np.array([p.cpu_s - p.prepare_s for p in phases])
    fits = []
    if np.linalg.matrix_rank(a) == 2:
        both = np.linalg.lstsq(a, b, rcond=None)[0]
        if (both >= 0).all():
            fits.append(both)
    for col in (0, 1):  # one of them at 0
        x = a[:, col]
        if x @ x > 0:
            fit = np.zeros(2)
            fit[col] = max(x @ b / (x @ x), 0.0)
            fits.append(fit)
    best = min(fits, key=lambda f: float(np.sum((a @ f - b) ** 2)), default=np.zeros(2))
    return float(best[0]), float(best[1])


def _calibrate(
    model_dir: str,
    profile: Any,
    cores: int | None,
    args: argparse.Namespace,
    workload: Any,
    probe: SpeedProbe | None,
    interference: float,
) -> tuple[Any, dict[str, Any]]:
    """The profile's overheads with ``request_s`` and ``step_s`` from isolated requests (one
    every 150 ms) through an idle ``aggregated`` deployment of one worker: the medians of
    measured minus simulated TTFT, and of measured minus simulated TPOT (one sequence: one
    decode step per token)."""
    from epdrt.planner.simulator import simulate
    from epdrt.planner.validation import observed_trace, runtime_deploy_config
    from epdrt.runtime.config import EPDConfig
    from epdrt.runtime.workload import TimedRequest

    config = EPDConfig(
        mode="aggregated", num_prefill=1, dtype=args.dtype, request_timeout_s=args.request_timeout
    )
    items = workload(args.calibration_requests, 1.0, args.seed + 2000)
    work = [TimedRequest(0.15 * i, it.request) for i, it in enumerate(items)]
    for it in work:
        it.request.id = f"cal-{it.request.id}"
    warm = workload(2, 1.0, args.seed + 3000)
    for i, it in enumerate(warm):
        it.request.id = f"cal-warmup{i}"
    # Then the same number all at once: batched, so fewer tokens messages per request.
    rush = [TimedRequest(0.0, it.request) for it in workload(len(work), 1.0, args.seed + 5000)]
    for it in rush:
        it.request.id = f"cal-rush-{it.request.id}"
    (observed, rushed), (speed, _), usage, _ = _serve(
        model_dir, config, [work, rush], warm, [], args.attempts, probe
    )
    phases = []
    for obs, used in zip((observed, rushed), usage):
        prepare = sum(profile.overheads.prepare(len(o.image_tokens)) for o in obs)
        phases.append(RouterPhase(len(obs), used.tokens_messages, used.cpu_s["router"], prepare))
    route_s, token_message_s = router_costs(phases)
    base = replace(
        profile,
        overheads=replace(
            profile.overheads,
            request_s=0.0,
            step_s=0.0,
            route_s=route_s,
            token_message_s=token_message_s,
        ),
    )
    base = base.with_batches_scaled(speed)
    trace = observed_trace(observed)
    res = simulate(
        base,
        runtime_deploy_config(config),
        trace,
        host_cores=cores,
        host_interference=interference,
        host_pinned=_pinned(config, cores),
    )
    ttft = {r.id: float(t) for r, t in zip(trace, res.ttft_s)}
    tpot = {r.id: float(t) for r, t in zip(trace, res.tpot_s)}
    residuals = [o.ttft_s - ttft[o.id] for o in observed]
    request_s = max(statistics.median(residuals), 0.0)
    # Drawn as request_s + spread (at least 0): the residuals themselves.
    spread = tuple(float(v) for v in np.quantile(np.asarray(residuals) - request_s, QUANTILES))
    decoded = [o for o in observed if o.tpot_s is not None]
    step_s = 0.0
    if decoded:
        step_s = max(statistics.median(o.tpot_s - tpot[o.id] for o in decoded), 0.0)
    detail = {
        "requests": len(observed),
        "spacing_s": 0.15,
        "median_measured_ttft_s": statistics.median(o.ttft_s for o in observed),
        "median_simulated_ttft_s": statistics.median(ttft.values()),
        "median_measured_tpot_s": statistics.median(o.tpot_s for o in decoded) if decoded else None,
        "median_simulated_tpot_s": statistics.median(tpot[o.id] for o in decoded)
        if decoded
        else None,
        "request_s": request_s,
        "step_s": step_s,
        "router_phases": [p.__dict__ for p in phases],
        "route_s": route_s,
        "token_message_s": token_message_s,
        "host_speed_ratio": speed,
    }
    detail["residual_quantiles_s"] = [request_s + v for v in spread]
    calibrated = replace(base.overheads, request_s=request_s, step_s=step_s, request_spread=spread)
    return calibrated, detail


def run(args: argparse.Namespace) -> list[Record]:
    import torch

    model_dir, tmp = model_dir_or_tiny(args.model, seed=args.seed, size=args.size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # One dtype for the profile and the runs it predicts.
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    cores = args.host_cores or (None if device == "cuda" else os.cpu_count())
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        _say(f"{time.perf_counter() - t0:5.1f}s {msg}")

    records: list[Record] = []
    for repeat in range(1, args.repeats + 1):
        if args.repeats > 1:
            say(f"repeat {repeat} of {args.repeats}")
        recs, rows = _repeat(args, model_dir, device, cores, say, repeat)
        for r in recs:
            r.extra["repeat"] = repeat
            r.extra["dtype"] = args.dtype
            if args.repeats > 1:
                r.case = f"{r.case} (repeat {repeat})"
        records += recs
        print(_table(rows), file=sys.stderr)
    if args.repeats > 1:
        records += median_records(records)
    say("done")
    if tmp is not None:
        tmp.cleanup()
    return records


def median_records(records: list[Record]) -> list[Record]:
    """Per (deployment, rate, metric) over the repeats: the median prediction against the
    median measurement (each repeat profiles, calibrates and measures anew, so this is the
    comparison least moved by a slow or fast moment of the host); the repeats' values in
    ``extra``."""
    from epdrt.planner.validation import agreement

    groups: dict[tuple[str, float, str], list[Record]] = {}
    for r in records:
        key = (r.extra["runtime_config"], r.extra["rate"], r.metric)
        groups.setdefault(key, []).append(r)
    out = []
    for (_, rate, metric), recs in groups.items():
        p = statistics.median(r.value for r in recs)
        m = statistics.median(r.baseline_value for r in recs)
        first = recs[0]
        out.append(
            Record(
                bench="planner",
                case=f"{first.case.split(' (repeat')[0]} (median of {len(recs)} repeats)",
                metric=metric,
                value=p,
                baseline=first.baseline,
                baseline_value=m,
                ratio=agreement(p, m),
                extra={
                    "predicted": p,
                    "measured": m,
                    "error": abs(p - m) / m,
                    "rate": rate,
                    "runtime_config": first.extra["runtime_config"],
                    "config": first.extra["config"],
                    "repeats_predicted": [r.value for r in recs],
                    "repeats_measured": [r.baseline_value for r in recs],
                },
            )
        )
    return out


def _repeat(
    args: argparse.Namespace,
    model_dir: str,
    device: str,
    cores: int | None,
    say: Any,
    repeat: int,
) -> tuple[list[Record], list[_Row]]:
    """One measurement: profile (unless given), calibrate, serve and simulate every deployment
    at every rate; the records and the table rows."""
    import torch

    from epdrt.planner.model_runner import profile_model
    from epdrt.planner.profile import load_profile
    from epdrt.planner.profiler import load_transfer_records
    from epdrt.planner.simulator import Prediction, simulate
    from epdrt.planner.validation import (
        observed_metrics,
        observed_trace,
        runtime_deploy_config,
        validation_records,
    )
    from epdrt.runtime.config import EPDConfig
    from epdrt.runtime.stage_model import Preprocessor
    from epdrt.runtime.workload import poisson_workload

    if args.profile:
        profile = load_profile(args.profile)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each runtime worker
        try:
            if args.transfer:
                link, note = (
                    load_transfer_records(args.transfer, "ipc"),
                    f"ipc records of {args.transfer}",
                )
            else:
                link, note = link_for_profile(device, lambda m: say(f"profile: {m}"))
            profile = profile_model(
                model_dir,
                device=device,
                dtype=args.dtype,
                transfer=link,
                transfer_note=note,
                quick=args.quick_profile,
                progress=lambda m: say(f"profile: {m}"),
            )
        finally:
            torch.set_num_threads(threads)
    # Taken right after profiling: its reference is the host's speed during the profile.
    probe, interference = None, 0.0
    if device == "cpu" and not args.no_host_probes:
        probe = SpeedProbe(model_dir)
        say(f"speed probe: {probe.reference * 1e3:.1f} ms (the reference)")
        if (cores or 1) > 1:
            interference = probe.interference()
            say(f"host interference: {interference:.1%} slower with a second process running")
        if args.profile:  # no reference beside the profile: measure the interference only
            probe.close()
            probe = None
    lo, hi = (int(x) for x in args.images.split(","))
    new_lo, new_hi = (int(x) for x in args.max_new_tokens.split(","))
    placeholder = Preprocessor.load(model_dir, EPDConfig()).placeholder

    def workload(n: int, rate: float, seed: int, largest: bool = False) -> list[Any]:
        """The workload's requests; ``largest``: all of the most images and tokens."""
        images, tokens = ((hi, hi), (new_hi, new_hi)) if largest else ((lo, hi), (new_lo, new_hi))
        return poisson_workload(
            n, rate, placeholder, images_per_request=images, max_new_tokens=tokens,
            repeat_image_prob=0.0, seed=seed,
        )  # fmt: skip

    calibration: dict[str, Any] = {}
    uncalibrated = profile
    if not args.no_calibrate:
        say(f"calibrating: {args.calibration_requests} isolated requests, aggregated")
        overheads, calibration = _calibrate(
            model_dir, profile, cores, args, workload, probe, interference
        )
        uncalibrated = replace(
            profile, overheads=replace(overheads, request_s=0.0, step_s=0.0, request_spread=())
        )
        profile = replace(profile, overheads=overheads)
        say(
            f"request_s = {overheads.request_s * 1e3:.2f} ms, "
            f"step_s = {overheads.step_s * 1e3:.3f} ms"
        )
    if args.save_profile:
        path = Path(args.save_profile)
        if args.repeats > 1:
            path = path.with_name(f"{path.stem}-{repeat}{path.suffix}")
        profile.save(path)

    rates = [float(x) for x in args.rates.split(",")]
    records: list[Record] = []
    rows = []
    for mode, e, p, d in _deployments(args.deployments):
        config = EPDConfig(
            mode=mode, num_encode=max(e, 1), num_prefill=p, num_decode=max(d, 1),
            dtype=args.dtype, request_timeout_s=args.request_timeout,
        )  # fmt: skip
        works = [workload(args.requests, rate, args.seed + k) for k, rate in enumerate(rates)]
        for k, work in enumerate(works):
            for item in work:
                item.request.id = f"{item.request.id}-{k}"
        warm = workload(args.warmup, 1.0, args.seed + 1000)
        for i, item in enumerate(warm):
            item.request.id = f"warmup{i}"
        burst = workload(args.warmup_burst, 1.0, args.seed + 4000, largest=True)
        for i, item in enumerate(burst):
            item.request.id = f"burst{i}"
        load_before = os.getloadavg()[0]
        say(f"{mode}: {args.requests} requests at each of {rates}/s")
        runs, speeds, usage, launches = _serve(
            model_dir, config, works, warm, burst, args.attempts, probe
        )
        load_after = os.getloadavg()[0]
        sim_cfg = runtime_deploy_config(config)
        for rate, observed, speed, used in zip(rates, runs, speeds, usage):
            trace = observed_trace(observed)
            now = profile.with_batches_scaled(speed)  # the profile at the host's speed now
            pinned = _pinned(config, cores)
            host = (cores, interference, pinned)
            # One simulation gives the prediction, the CPU it charges and the saved requests.
            res = simulate(
                now,
                sim_cfg,
                trace,
                host_cores=cores,
                host_interference=interference,
                host_pinned=pinned,
            )
            pred = Prediction.of(res).as_dict()
            cpu_s = _cpu_table(config, used.cpu_s, res)
            ablations = {
                "predicted_without_calibration": _forecast(
                    uncalibrated.with_batches_scaled(speed), sim_cfg, trace, *host
                ),
                "predicted_without_speed_probe": _forecast(profile, sim_cfg, trace, *host),
                "predicted_without_shared_cores": _forecast(now, sim_cfg, trace, None, 0.0, False),
                "predicted_without_interference": _forecast(
                    now, sim_cfg, trace, cores, 0.0, pinned
                ),
                "predicted_without_pinning": _forecast(
                    now, sim_cfg, trace, cores, interference, False
                ),
                "predicted_without_jitter": _forecast(
                    replace(now, jitter=()), sim_cfg, trace, *host
                ),
                "predicted_without_request_spread": _forecast(
                    replace(now, overheads=replace(now.overheads, request_spread=())),
                    sim_cfg,
                    trace,
                    *host,
                ),
            }
            if args.save_runs:
                sub = f"repeat{repeat}/" if args.repeats > 1 else ""
                path = Path(args.save_runs) / f"{sub}{mode}-{rate:g}.jsonl"
                _save_run(path, observed, trace, res)
            meas = observed_metrics(observed)
            keep = {k: pred[k] for k in METRICS if k in pred}
            recs = validation_records(
                sim_cfg,
                keep,
                meas,
                extra={
                    "runtime_config": _runtime_label(config),
                    "requests": args.requests,
                    "rate": rate,
                    "images_per_request": args.images,
                    "max_new_tokens": args.max_new_tokens,
                    "profile": profile.name,
                    "profile_source": profile.source,
                    "overheads": profile.overheads.to_dict(),
                    "calibration": calibration,
                    "loadavg_1min_before": load_before,
                    "loadavg_1min_after": load_after,
                    "host_cpus": os.cpu_count(),
                    "simulated_host_cores": cores,
                    "simulated_pinned_workers": pinned,
                    "launches": launches,
                    "host_speed_ratio": speed,
                    "host_interference": interference,
                    "cpu_s": cpu_s,
                },
            )
            for r in recs:
                r.case = f"{sim_cfg.label()} @ {rate:g} req/s {r.metric}"
                r.extra["error"] = abs(r.value - r.baseline_value) / r.baseline_value
                for name, values in ablations.items():
                    r.extra[name] = values[r.metric]
            records += recs
            rows.append((f"{mode}@{rate:g}", keep, meas, cpu_s))
    if probe is not None:
        probe.close()
    return records, rows


def _forecast(
    profile: Any,
    config: Any,
    trace: list[Any],
    cores: int | None,
    interference: float,
    pinned: bool,
) -> dict[str, float]:
    """The simulator's prediction as a dict (predict() with the host's sharing)."""
    from epdrt.planner.simulator import predict

    return predict(
        profile,
        config,
        trace,
        host_cores=cores,
        host_interference=interference,
        host_pinned=pinned,
    ).as_dict()


def _pinned(config: Any, cores: int | None) -> bool:
    """Whether the runtime pins ``config``'s CPU workers to cores of their own on this host."""
    from epdrt.runtime.cluster import cpu_workers_pinned

    return cores is not None and cpu_workers_pinned(
        len(config.worker_roles()), config.cpu_threads, cores
    )


def _cpu_table(
    runtime_config: Any, measured: dict[str, float], res: Any
) -> dict[str, dict[str, Any]]:
    """Per process (runtime worker name, and ``router``): the CPU seconds it used while serving
    against the work seconds simulation ``res`` charged to it (its ``sim`` name: E0, P0, ...)."""
    names = [name for name, _ in runtime_config.worker_roles()] + ["router"]
    return {
        name: {"sim": sim, "measured": measured[name], "simulated": work}
        for name, (sim, work) in zip(names, res.work_s.items(), strict=True)
    }


def _save_run(path: Path, observed: list[Any], trace: list[Any], res: Any) -> None:
    """Each request: what the runtime measured beside what simulation ``res`` of ``trace``
    (the same requests) gives it."""
    sim = {r.id: (float(a), float(b)) for r, a, b in zip(trace, res.ttft_s, res.tpot_s)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for o in observed:
            row = dict(o.__dict__)
            row["sim_ttft_s"], row["sim_tpot_s"] = sim[o.id]
            f.write(json.dumps(row) + "\n")


def _table(rows: list[_Row]) -> str:
    lines = [f"{'deployment':16} {'metric':14} {'predicted':>10} {'measured':>10} {'error':>7}"]
    for mode, pred, meas, cpu in rows:
        cells = []
        for k in METRICS:
            if k in pred and k in meas:
                scale, unit = (1e3, "ms") if k.endswith("_s") else (1.0, "")
                cells.append((k, pred[k] * scale, meas[k] * scale, unit))
        # Per process: the work the simulation charged to it against the CPU it used.
        cells += [(f"cpu {n}", c["simulated"], c["measured"], "s") for n, c in cpu.items()]
        for name, p, m, unit in cells:
            err = abs(p - m) / m if m else float("inf")
            lines.append(f"{mode:16} {name:14} {p:>8.2f}{unit:2} {m:>8.2f}{unit:2} {err:>6.1%}")
    return "\n".join(lines)
