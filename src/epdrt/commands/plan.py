# SPDX-License-Identifier: Apache-2.0
"""``epdrt plan``: search E/P/D deployments of a profiled model for the fewest GPUs meeting the
SLOs at a request rate (or, without ``--rate``, the highest goodput per GPU); prints a ranked
table beside the best pd and aggregated baselines, writes JSON and a goodput-vs-rate PNG."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from epdrt.commands import add_json_option, write_json

WORKLOAD_DEFAULTS = {
    "images": "1-4",
    "image_tokens": "1024",
    "prompt_tokens": "32-256",
    "output_tokens": "32-512",
}


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="search E/P/D configs for the fewest GPUs meeting TTFT/TPOT SLOs (simulated)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Distributions (--images, --image-tokens, --prompt-tokens, --output-tokens): "
            "'4' constant, '2-8' uniform, '0:0.6,1:0.4' value:weight.\n"
            "Built-in profiles: see 'epdrt plan --list-profiles'. An estimated profile is "
            "an estimate: say so wherever you quote its numbers."
        ),
    )
    p.add_argument("--profile", help="profile JSON path or built-in profile name")
    p.add_argument("--list-profiles", action="store_true", help="list built-in profiles, exit")
    p.add_argument("--rate", type=float, help="request rate to serve, req/s (omit: goodput/GPU)")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO, seconds")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO, seconds")
    p.add_argument("--gpus", type=int, help="GPU budget")
    p.add_argument("--target", type=float, default=0.9, help="share meeting both SLOs (0.9)")
    p.add_argument("--trace", help="JSONL trace to replay (rescaled to each rate)")
    for key, default in WORKLOAD_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, default=default, help=f"distribution (default {default})")
    p.add_argument(
        "--requests",
        type=int,
        help="simulated requests per run (default: ~6 request lifetimes at the rate, 1000-3000)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="epd,pd,ed,aggregated", help="modes to search")
    p.add_argument("--top", type=int, default=6, help="ranked rows to show")
    p.add_argument("--png", help="goodput-vs-rate plot (default: beside --json, .png)")
    p.add_argument("--no-png", action="store_true", help="skip the plot (saves simulations)")
    add_json_option(p)
    p.set_defaults(func=_run)


def _fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    if v is None or v != v:
        return "-"
    return f"{v * scale:.{digits}g}"


def _table(rows: list[Any], target: float, rate: float | None) -> str:
    head = [
        "#",
        "mode",
        "pools",
        "enc batch",
        "pre tokens",
        "dec batch",
        "split",
        "GPUs",
        f"SLO@{rate:g}" if rate is not None else "SLO@goodput",
        "TTFT p90 s",
        "TPOT p90 ms",
        "goodput r/s",
        "goodput/GPU",
    ]
    lines = [head]
    for i, e in enumerate(rows, 1):
        c = e.config
        att = f"{e.attainment:.0%}" + ("<" if e.aborted else "")
        if e.attainment < target:
            att += " !"
        lines.append(
            [
                str(i),
                c.mode,
                c.counts_label(),
                str(c.encode_batch),
                str(c.prefill_tokens),
                str(c.decode_batch),
                str(c.image_split) if c.mode in ("epd", "ed") else "-",
                str(c.num_gpus),
                att,
                _fmt(e.ttft_p90_s),
                _fmt(e.tpot_p90_s, 1e3),
                _fmt(e.goodput_rps),
                _fmt(e.goodput_per_gpu),
            ]
        )
    widths = [max(len(r[j]) for r in lines) for j in range(len(head))]
    out = ["  ".join(v.rjust(w) if j != 1 else v.ljust(w) for j, (v, w) in
                     enumerate(zip(r, widths))).rstrip() for r in lines]  # fmt: skip
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _run(args: argparse.Namespace) -> int:
    from epdrt.errors import InvalidArgument
    from epdrt.planner.capacity import WorkloadStats, stage_work, suggest_num_requests
    from epdrt.planner.config import DeployConfig
    from epdrt.planner.metrics import SLO
    from epdrt.planner.profile import builtin_profiles, load_profile
    from epdrt.planner.search import SearchSpace, curve_configs, curves, search
    from epdrt.planner.workload import IntDist, WorkloadSpec, load_trace, poisson_workload

    if args.list_profiles:
        for name in builtin_profiles():
            prof = load_profile(name)
            print(f"{name:32} source={prof.source:10} {prof.name}")
        return 0
    missing = [f for f in ("profile", "slo_ttft", "slo_tpot", "gpus") if getattr(args, f) is None]
    if missing:
        print(
            "epdrt plan: missing " + ", ".join("--" + m.replace("_", "-") for m in missing),
            file=sys.stderr,
        )
        return 2

    def progress(msg: str) -> None:
        print(f"[plan {time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        profile = load_profile(args.profile)
        slo = SLO(args.slo_ttft, args.slo_tpot, args.target)
        if args.trace:
            workload = load_trace(args.trace)
        else:
            spec = WorkloadSpec(
                IntDist.parse(args.images),
                IntDist.parse(args.image_tokens),
                IntDist.parse(args.prompt_tokens),
                IntDist.parse(args.output_tokens),
            )
            n_req = args.requests
            if n_req is None:
                probe = poisson_workload(spec, 400, args.seed)
                rate = args.rate
                if rate is None:  # about what the whole budget serves, aggregated
                    work = stage_work(
                        profile, DeployConfig("aggregated", 1, 1, 1), WorkloadStats.of(probe)
                    )
                    rate = 0.7 * args.gpus / (work.encode_s + work.prefill_s + work.decode_s)
                n_req = suggest_num_requests(profile, probe, rate)  # fmt: skip
            workload = poisson_workload(spec, n_req, args.seed)
        space = SearchSpace(modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()))
        plan = search(profile, workload, slo, args.gpus, args.rate, space, args.top, progress)
    except InvalidArgument as e:
        print(f"epdrt plan: {e}", file=sys.stderr)
        return 2

    if profile.source != "measured":
        print(f"NOTE: profile '{profile.name}' is {profile.source.upper()}, not measured.")
    print(f"workload: {workload.description} ({len(workload)} requests per simulation)")
    goal = (
        f"fewest GPUs with >= {slo.target:.0%} of requests meeting TTFT <= {slo.ttft_s:g}s and "
        f"TPOT <= {slo.tpot_s * 1e3:g}ms at {args.rate:g} req/s"
        if args.rate is not None
        else f"highest goodput per GPU (TTFT <= {slo.ttft_s:g}s, TPOT <= {slo.tpot_s * 1e3:g}ms)"
    )
    print(f"objective: {goal}, budget {args.gpus} GPUs")
    print()
    print(_table(plan.ranked, slo.target, args.rate))
    print()
    print("best per mode:")
    print(_table([e for e in plan.best_by_mode.values() if e is not None], slo.target, args.rate))
    for mode, e in plan.best_by_mode.items():
        if e is None:
            print(f"   {mode}: nothing simulated (every combination pruned: memory, latency "
                  "or budget; see notes)")  # fmt: skip
    print()
    print(plan.recommendation)
    for note in plan.notes:
        print(f"note: {note}")
    print(
        f"({plan.num_simulations} simulations in {plan.elapsed_s:.1f}s; '<' = run stopped "
        "early, the share is an upper bound; '!' = below the target)"
    )

    out: dict[str, Any] = plan.to_dict()
    out["profile"] = {"name": profile.name, "source": profile.source, "device": profile.device}
    out["workload"] = {"description": workload.description, "requests": len(workload)}
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json and args.json != "-"
                       else None)  # fmt: skip
    if png and not args.no_png and plan.ranked:
        configs = curve_configs(plan, num_top=2)
        peak = max([e.goodput_rps or 0.0 for e in plan.ranked] + [args.rate or 0.0])
        if peak > 0:
            rates = [peak * f for f in (0.3, 0.6, 0.8, 0.9, 1.0, 1.1, 1.25)]
            progress(f"plotting {len(configs)} configs at {len(rates)} rates")
            from epdrt.planner.plot import plot_curves

            data = curves(profile, workload, slo, configs, rates)
            src = "" if profile.source in profile.name else f" [{profile.source}]"
            title = (
                f"{profile.name}{src}: SLO TTFT <= {slo.ttft_s:g}s, "
                f"TPOT <= {slo.tpot_s * 1e3:g}ms, target {slo.target:.0%}"
            )
            plot_curves(data, slo, png, rate=args.rate, title=title)
            out["curves"] = {k: [list(p) for p in v] for k, v in data.items()}
            out["png"] = png
            print(f"plot: {png}")
    if args.json:
        write_json(out, args.json)
    return 0
