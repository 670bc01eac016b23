# SPDX-License-Identifier: Apache-2.0
"""``epdrt run``: serve a JSONL file of requests through a deployment and report per request.

Each input line: ``{"id", "prompt", "images": [paths], "max_new_tokens"}`` and optionally
``"arrival_s"`` (seconds after start; all at once otherwise), ``"stop"`` (strings) and the
sampling keys ``temperature, top_p, top_k, seed, stop_token_ids, ignore_eos`` (greedy
without). The JSON output holds, per request, ``id, token_ids, text, ttft_s, tpot_s, encode_s,
e2e_s, error``, and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epdrt.commands import (
    UsageError,
    add_cluster_options,
    add_json_option,
    cluster_config,
    write_json,
)
from epdrt.errors import InvalidArgument
from epdrt.runtime.request import Request, RequestError, RequestResult
from epdrt.runtime.sampling import SamplingParams
from epdrt.runtime.workload import TimedRequest


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="serve a JSONL file of requests (epd, pd or aggregated)", description=__doc__
    )
    add_cluster_options(p)
    p.add_argument("--requests", required=True, help="JSONL file of requests")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds (for goodput)")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds (for goodput)")
    add_json_option(p)
    p.set_defaults(func=_run)


@dataclass
class RequestLines:
    """A request file read line by line: the requests to serve, and the lines that could not
    become one (their results, each with a clear ``error``). ``order`` lists every id in
    file order."""

    workload: list[TimedRequest] = field(default_factory=list)
    rejected: dict[str, RequestResult] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


#: Request-line keys that go to SamplingParams.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")


def _field(row: dict, name: str, kinds: type | tuple[type, ...], what: str, default: Any) -> Any:
    """``row[name]`` (``default`` when absent) if it is one of ``kinds`` (never a bool); else
    RequestError naming the type it is."""
    value = row.get(name, default)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f'"{name}" must be {what}, got {type(value).__name__} {value!r}')
    return value


def parse_request(row: Any, base: Path, n: int) -> TimedRequest:
    """One JSON line as a timed request; RequestError says what is wrong with it."""
    if not isinstance(row, dict):
        raise RequestError(f"a request line is a JSON object, got {type(row).__name__}")
    prompt = _field(row, "prompt", str, "a string", None)
    images = _field(row, "images", list, "a list of image paths", [])
    for i, image in enumerate(images):
        if not isinstance(image, str):
            raise RequestError(f'"images"[{i}] must be a path string, got {image!r}')
    max_new = _field(row, "max_new_tokens", int, "a positive integer", 16)
    if max_new <= 0:
        raise RequestError(f'"max_new_tokens" must be a positive integer, got {max_new}')
    arrival = _field(row, "arrival_s", (int, float), "a number of seconds", 0.0)
    if not arrival >= 0:
        raise RequestError(f'"arrival_s" must be at least 0, got {arrival}')
    paths = [p if Path(p).is_absolute() else str(base / p) for p in images]
    try:
        sampling = SamplingParams(**{k: row[k] for k in SAMPLING_FIELDS if k in row})
    except InvalidArgument as exc:
        raise RequestError(str(exc)) from exc
    stop = _field(row, "stop", list, "a list of strings", [])
    request = Request(prompt, paths, max_new, id=_request_id(row, n), sampling=sampling, stop=stop)
    return TimedRequest(float(arrival), request)


def _request_id(row: Any, n: int) -> str:
    """The line's ``id`` (a string or an integer), else ``line<n>``."""
    rid = row.get("id") if isinstance(row, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"line{n}"


def load_requests(path: str) -> RequestLines:
    """Reads a JSONL request file; a bad line becomes that request's error, never the run's.

    Raises UsageError when the file cannot be read at all.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the request file {path}: {exc}") from exc
    lines = RequestLines()
    base = Path(path).parent
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row: Any = None
        try:
            row = json.loads(line)
            item = parse_request(row, base, n)
            if item.request.id in seen:
                raise RequestError(f"id {item.request.id!r} is used by an earlier line")
        except (json.JSONDecodeError, RequestError) as exc:
            req_id = _request_id(row, n)
            if req_id in seen:
                req_id = f"line{n}"
            what = "not JSON" if isinstance(exc, json.JSONDecodeError) else "bad request"
            error = f"{path}:{n}: {what}: {exc}"
            lines.rejected[req_id] = RequestResult(
                req_id, [], "", None, None, 0.0, None, error, "invalid"
            )
            lines.order.append(req_id)
            seen.add(req_id)
            continue
        lines.workload.append(item)
        lines.order.append(item.request.id)
        seen.add(item.request.id)
    return lines


def _run(args: argparse.Namespace) -> int:
    from epdrt.runtime.cluster import EPDCluster
    from epdrt.runtime.driver import replay, summarize

    config = cluster_config(args)
    lines = load_requests(args.requests)
    for bad in lines.rejected.values():
        print(f"skipping {bad.id}: {bad.error}", file=sys.stderr)
    print(
        f"launching {config.mode} workers: {[n for n, _ in config.worker_roles()]}", file=sys.stderr
    )
    with EPDCluster.launch(args.model, config) as cluster:
        served, wall = replay(cluster, lines.workload, label=config.mode)
    by_id = {**lines.rejected, **{r.id: r for r in served}}
    results = [by_id[i] for i in lines.order]
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
