# SPDX-License-Identifier: Apache-2.0
"""End-to-end serving: EPD against the ``pd`` and ``aggregated`` baselines on the same
workload and devices. TTFT/TPOT percentiles, throughput, goodput under SLOs and peak memory.

Without ``--model`` a tiny random-weight LLaVA is made (CPU-sized). On a GPU host pass a model
directory of real-size shapes (``epdrt make-tiny-model DIR --size 7b``) and enough GPUs for the
stage counts (one GPU per worker).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec
import torch

from epdrt.benchmarking import Record, model_dir_or_tiny

HELP = "EPD vs pd vs aggregated: TTFT, TPOT, throughput, goodput, peak memory"

# (metric, summary key, higher is better)
METRICS = [
    ("TTFT p50 s", "ttft_p50_s", False),
    ("TTFT p90 s", "ttft_p90_s", False),
    ("TPOT p50 s", "tpot_p50_s", False),
    ("TPOT p90 s", "tpot_p90_s", False),
    ("requests/s", "requests_per_s", True),
    ("goodput requests/s", "goodput_requests_per_s", True),
    ("SLO attainment", "slo_attainment", True),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: a fresh tiny LLaVA)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--images", default="1,4", help="min,max images per request")
    parser.add_argument("--encode", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    parser.add_argument("--plot", help="PNG path (default: beside --json)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="weights, KV and MM tokens (default: bfloat16 on a GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds before a request fails (a lost request must not stall the whole run)",
    )
    parser.add_argument(
        "--kv-handoff", default="layerwise",
        help="KV hand-off of every deployment (layerwise or pull); each further value after a "
        "comma adds an epd run with that hand-off as a peer (e.g. layerwise,pull)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> list[Record]:
    from epdrt.runtime.compare import format_runs, plot_runs, run_modes, token_mismatches
    from epdrt.runtime.config import EPDConfig
    from epdrt.runtime.stage_model import Preprocessor
    from epdrt.runtime.workload import poisson_workload

    model_dir, tmp = model_dir_or_tiny(args.model, seed=args.seed)
    lo, hi = (int(x) for x in args.images.split(","))
    placeholder = Preprocessor.load(model_dir, EPDConfig()).placeholder
    workload = poisson_workload(
        args.requests, args.rate, placeholder, images_per_request=(lo, hi), seed=args.seed
    )
    # Same devices for all: EPD's E+P+D worker count, pd's E+P and D, aggregated's workers.
    total = args.encode + args.prefill + args.decode
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    handoff, *peers = args.kv_handoff.split(",")
    common = dict(dtype=dtype, request_timeout_s=args.request_timeout, kv_handoff=handoff)
    configs = [
        ("epd", EPDConfig(mode="epd", num_encode=args.encode, num_prefill=args.prefill,
                          num_decode=args.decode, **common)),
        ("pd", EPDConfig(mode="pd", num_prefill=args.encode + args.prefill,
                         num_decode=args.decode, **common)),
        ("aggregated", EPDConfig(mode="aggregated", num_prefill=total, **common)),
    ]  # fmt: skip
    for peer in peers:
        epd = configs[0][1]
        configs.append((f"epd-{peer}", msgspec.structs.replace(epd, kv_handoff=peer)))
    runs = run_modes(
        model_dir, workload, configs, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot
    )
    print(format_runs(runs), file=sys.stderr)
    for run in runs:
        if run.shares_devices:
            print(f"NOTE: {run.label}'s workers share GPUs: {run.worker_devices}", file=sys.stderr)
    for base in runs[1:]:
        bad = token_mismatches(runs[0], base)
        if bad:
            print(f"WARNING: tokens differ between epd and {base.label} for {bad}", file=sys.stderr)
    if args.plot or args.json not in (None, "-"):
        plot = args.plot or str(Path(args.json).with_suffix(".png"))
        plot_runs(runs, plot, f"e2e: {args.requests} requests at {args.rate}/s, {lo}-{hi} images")
    if tmp is not None:
        tmp.cleanup()
    return _records(runs, args)


def _records(runs, args: argparse.Namespace) -> list[Record]:
    epd, baselines = runs[0], runs[1:]
    stages = f"E{args.encode}P{args.prefill}D{args.decode}"
    case = f"{args.requests} req @ {args.rate}/s, {args.images} img, {stages}"
    # Where each deployment's workers ran: on a host with fewer GPUs than workers they share
    # devices, and the comparison is of schedules on shared hardware, not of separate GPUs.
    placement = {
        "devices": {run.label: run.worker_devices for run in runs},
        "workers_share_devices": {run.label: run.shares_devices for run in runs},
    }
    records = []
    for base in baselines:
        for metric, key, higher in METRICS:
            value, baseline = epd.summary.get(key), base.summary.get(key)
            if value is None or baseline is None or value == 0 or baseline == 0:
                continue
            records.append(
                Record(
                    bench="e2e", case=f"{case} vs {base.label}", metric=metric, value=value,
                    baseline=base.label, baseline_value=baseline,
                    ratio=value / baseline if higher else baseline / value, extra=placement,
                )
            )  # fmt: skip
        if epd.kv_handoff_s and base.kv_handoff_s:
            records.append(
                Record(
                    bench="e2e", case=f"{case} vs {base.label}", metric="KV hand-off mean s",
                    value=epd.kv_handoff_s, baseline=base.label,
                    baseline_value=base.kv_handoff_s, ratio=base.kv_handoff_s / epd.kv_handoff_s,
                    extra={**placement, "kv_handoff": epd.config.kv_handoff},
                )
            )  # fmt: skip
        epd_mem, base_mem = epd.peak_memory_by_stage(), base.peak_memory_by_stage()
        enc_epd = epd_mem.get("E")
        enc_base = max((v for k, v in base_mem.items() if "E" in k), default=None)
        if enc_epd and enc_base:
            records.append(
                Record(
                    bench="e2e", case=f"{case} vs {base.label}", metric="encoder-device peak bytes",
                    value=enc_epd, baseline=base.label, baseline_value=enc_base,
                    ratio=enc_base / enc_epd, extra=placement,
                )
            )  # fmt: skip
    return records
