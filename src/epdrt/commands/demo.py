# SPDX-License-Identifier: Apache-2.0
"""``epdrt demo``: a tiny LLaVA served disaggregated (1 encode + 1 prefill + 1 decode worker)
and aggregated (one worker) on the same synthetic workload; checks both give the same tokens.

Writes ``OUT/demo.json`` (per-request results and summaries) and ``OUT/demo.png``. On a GPU host
the workers are placed on GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epdrt.commands import add_json_option, write_json


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="EPD vs aggregated on a tiny LLaVA", description=__doc__)
    p.add_argument("--out", default="out/demo", help="directory for the model, JSON and PNG")
    p.add_argument("--requests", type=int, default=24, help="number of requests")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate (requests/s)")
    p.add_argument("--seed", type=int, default=0)
    add_json_option(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from epdrt.models import make_tiny_model
    from epdrt.runtime.compare import format_runs, plot_runs, run_modes, token_mismatches
    from epdrt.runtime.config import EPDConfig
    from epdrt.runtime.stage_model import Preprocessor
    from epdrt.runtime.workload import poisson_workload

    out = Path(args.out)
    model_dir = out / "tiny-llava"
    if not (model_dir / "config.json").exists():
        print(f"writing a tiny random-weight LLaVA to {model_dir}", file=sys.stderr)
        make_tiny_model(model_dir, "llava", seed=args.seed)
    placeholder = Preprocessor.load(str(model_dir), EPDConfig()).placeholder
    workload = poisson_workload(args.requests, args.rate, placeholder, seed=args.seed)
    configs = [
        ("epd 1E+1P+1D", EPDConfig(mode="epd")),
        ("aggregated", EPDConfig(mode="aggregated")),
    ]
    runs = run_modes(model_dir, workload, configs)
    mismatches = token_mismatches(runs[0], runs[1])
    print(format_runs(runs))
    images = sum(len(t.request.images) for t in workload)
    for run in runs:
        encoded = run.counter("images_encoded")
        print(
            f"{run.label}: {images} images in requests, {encoded:.0f} encoded"
            " (the rest were MM-token cache hits)"
        )
    verdict = "identical" if not mismatches else f"DIFFERENT for {mismatches}"
    print(f"tokens, epd vs aggregated: {verdict}")
    plot_runs(runs, out / "demo.png", f"{args.requests} requests, Poisson {args.rate}/s")
    report = {
        "requests": args.requests,
        "rate_per_s": args.rate,
        "token_mismatches": mismatches,
        "runs": [
            {
                "label": r.label,
                "config": json.loads(r.config.to_json()),
                "summary": r.summary,
                "peak_memory_by_stage": r.peak_memory_by_stage(),
                "worker_stats": r.worker_stats,
                "results": [x.to_json() for x in r.results],
            }
            for r in runs
        ],
    }
    write_json(report, str(out / "demo.json"))
    if args.json:
        write_json(report, args.json)
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}", file=sys.stderr)
    failed = sum(r.summary["failed"] for r in runs)
    return 0 if not mismatches and failed == 0 else 1
