# SPDX-License-Identifier: Apache-2.0
"""``epdrt run``: serve a JSONL file of requests through a deployment and report per request.

Each input line: ``{"id", "prompt", "images": [paths], "max_new_tokens"}`` and optionally
``"arrival_s"`` (seconds after start; all at once otherwise). The JSON output holds, per request,
``id, token_ids, text, ttft_s, tpot_s, encode_s, e2e_s, error``, and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epdrt.commands import add_json_option, write_json


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="serve a JSONL file of requests (epd, pd or aggregated)", description=__doc__
    )
    p.add_argument("--model", required=True, help="model directory (config, weights, processor)")
    p.add_argument("--requests", required=True, help="JSONL file of requests")
    p.add_argument("--mode", choices=["epd", "pd", "aggregated"], default="epd")
    p.add_argument("--encode", type=int, default=1, help="encode workers (epd)")
    p.add_argument(
        "--prefill", type=int, default=1, help="prefill (pd: E+P; aggregated: all) workers"
    )
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--config", help="EPDConfig as JSON (overrides the flags above)")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds (for goodput)")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds (for goodput)")
    add_json_option(p)
    p.set_defaults(func=_run)


def load_requests(path: str) -> list:
    from epdrt.runtime.request import Request
    from epdrt.runtime.workload import TimedRequest

    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            req = Request(
                prompt=row["prompt"],
                images=[
                    str(Path(path).parent / p) if not Path(p).is_absolute() else p
                    for p in row.get("images", [])
                ],
                max_new_tokens=int(row.get("max_new_tokens", 16)),
                id=str(row.get("id", f"line{n}")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise SystemExit(f"{path}:{n}: bad request line: {exc}") from exc
        out.append(TimedRequest(float(row.get("arrival_s", 0.0)), req))
    return out


def _run(args: argparse.Namespace) -> int:
    from epdrt.runtime.cluster import EPDCluster
    from epdrt.runtime.config import EPDConfig
    from epdrt.runtime.driver import replay, summarize

    if args.config:
        config = EPDConfig.from_json(args.config)
    else:
        config = EPDConfig(
            mode=args.mode, num_encode=args.encode, num_prefill=args.prefill, num_decode=args.decode
        )
    workload = load_requests(args.requests)
    print(
        f"launching {config.mode} workers: {[n for n, _ in config.worker_roles()]}", file=sys.stderr
    )
    with EPDCluster.launch(args.model, config) as cluster:
        results, wall = replay(cluster, workload, label=config.mode)
    summary = summarize(results, wall, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot)
    for r in results:
        status = "ok" if r.error is None else f"ERROR {r.error}"
        print(f"{r.id}: {len(r.token_ids)} tokens, ttft {r.ttft_s}, {status}")
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(
            {
                "config": json.loads(config.to_json()),
                "requests": [r.to_json() for r in results],
                "summary": summary,
                "worker_stats": cluster.worker_stats(),
            },
            args.json,
        )
    return 0
