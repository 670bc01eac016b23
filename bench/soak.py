# SPDX-License-Identifier: Apache-2.0
"""Soak over HTTP: many streamed chat requests with bad images, clients that disconnect
mid-stream and one worker killed halfway, then leak checks.

The cluster and ``epdrt serve``'s app run in this process (the server on a thread), so its
memory and file descriptors are the server's. After ``--warmup`` requests the resident memory
and open descriptors are noted; after the run, once the killed worker is back and every
request has ended, they are compared (target: within 10%), every cache must hold zero blocks
in use, and /dev/shm nothing of ours. Every request must get an answer or a clear error:

- good: 200 with ``--max-tokens`` tokens, or (around the kill) an error naming the worker
  that died or saying none was available;
- bad image: 400 (or 503 while the router's queue is full);
- disconnect: the client closes after its first chunk (the server aborts the request).

Anything else (no answer, a bad image accepted, an error without a message) is counted as
``unexpected``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter

from epdrt.benchmarking import Record, model_dir_or_tiny

HELP = "soak over HTTP: bad images, disconnects and a killed worker, then leak checks"

TEMPLATE = (
    "{% for m in messages %}{% for p in m.content %}{% if p.type == 'image' %}PH {% else %}"
    "{{ p.text }}{% endif %}{% endfor %}{% endfor %}"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: a fresh tiny LLaVA)")
    parser.add_argument("--mode", default="epd", help="epd, pd or aggregated")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s (Poisson)")
    parser.add_argument("--bad-images", type=float, default=0.10, help="fraction")
    parser.add_argument("--disconnects", type=float, default=0.05, help="fraction")
    parser.add_argument("--kill", default="d0", help="worker killed halfway ('' for none)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=40, help="requests before the baseline")
    parser.add_argument("--seed", type=int, default=0)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _ours_in_shm() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("epdrt"))


def _requests(n: int, args, rng: random.Random) -> list[tuple[str, list[dict]]]:
    """``(kind, message content)``: kind "good", "bad" (corrupt image) or "disconnect"."""
    import io

    from PIL import Image

    images = []
    for i in range(8):  # a few distinct images, so the caches both hit and miss
        buf = io.BytesIO()
        Image.new("RGB", (32 + 4 * i, 32), (i * 30, 90, 200 - i * 20)).save(buf, format="PNG")
        images.append(buf.getvalue())
    out = []
    for i in range(n):
        roll = rng.random()
        kind = "good"
        if roll < args.bad_images:
            kind = "bad"
        elif roll < args.bad_images + args.disconnects:
            kind = "disconnect"
        data = b"\x89PNG\r\n\x1a\nnot an image" if kind == "bad" else rng.choice(images)
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": f"describe picture {i}"}]  # fmt: skip
        out.append((kind, content))
    return out


async def _one(client, kind: str, content: list[dict], max_tokens: int) -> tuple[str, str]:
    """The request's outcome and detail: ok, rejected (4xx), failed (an error with its
    reason), disconnected, or unexpected."""
    import httpx

    from epdrt.serve.client import chat_stream_body, sse_events

    body = chat_stream_body("m", content, max_tokens)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                error = json.loads(await resp.aread()).get("error", {}).get("message", "")
                if not error:
                    return "unexpected", f"HTTP {resp.status_code} without a message"
                if kind == "bad" and resp.status_code == 400:
                    return "rejected", error
                if kind == "bad" and resp.status_code != 503:  # 503: overloaded, a clear error
                    return "unexpected", f"bad image: HTTP {resp.status_code}: {error}"
                return "failed", f"HTTP {resp.status_code}: {error}"
            tokens = 0
            async for event in sse_events(resp):
                if kind == "disconnect":
                    return "disconnected", ""  # leaving the block closes the connection
                if "error" in event:
                    return "failed", event["error"]["message"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            if kind == "bad":
                return "unexpected", "a corrupt image was accepted"
            if tokens != max_tokens:
                return "unexpected", f"{tokens} tokens, not {max_tokens}"
            return "ok", ""
    except httpx.HTTPError as exc:
        return "unexpected", f"{type(exc).__name__}: {exc}"


async def _drive(url: str, plan, args, on_half) -> list[tuple[str, str, str]]:
    import httpx

    from epdrt.serve.client import client_limits

    rng = random.Random(args.seed + 1)
    limits = client_limits()
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        tasks = []
        for i, (kind, content) in enumerate(plan):
            if i == len(plan) // 2:
                on_half()
            tasks.append(asyncio.create_task(_one(client, kind, content, args.max_tokens)))
            if args.rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.rate))
            if (i + 1) % 50 == 0:
                print(f"\rsent {i + 1}/{len(plan)}", end="", file=sys.stderr)
        results = await asyncio.gather(*tasks)
        print(file=sys.stderr)
    return [(kind, outcome, detail) for (kind, _), (outcome, detail) in zip(plan, results)]


def _blocks_in_use(cluster) -> dict[str, float]:
    """Blocks in use per worker cache ("d0.kv_blocks_in_use": n), from the latest reports."""
    live = cluster.live_stats()
    return {f"{w}.{k}": v for w, s in live.items() for k, v in s.items()
            if k.endswith("_blocks_in_use")}  # fmt: skip


def _settled(cluster, timeout_s: float) -> dict[str, float]:
    """Waits until no request is in flight, every worker is alive and its latest report
    shows no block in use; returns the blocks in use per cache (0s when settled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = cluster.load()
        in_use = _blocks_in_use(cluster)
        alive = all(w["alive"] for w in load["workers"].values())
        if alive and not load["inflight"] and not any(in_use.values()):
            time.sleep(2 * cluster.config.stats_interval_s)  # one more report to be sure
            return _blocks_in_use(cluster)
        if time.monotonic() > deadline:
            return in_use
        time.sleep(0.1)


def run(args: argparse.Namespace) -> list[Record]:
    from epdrt.runtime import EPDCluster, EPDConfig
    from epdrt.serve.app import ServeSettings, build_app
    from epdrt.serve.background import BackgroundServer

    model_dir, tmp = model_dir_or_tiny(args.model, seed=args.seed)
    rng = random.Random(args.seed)
    config = EPDConfig(mode=args.mode, max_worker_restarts=3, restart_backoff_s=0.2,
                       stats_interval_s=0.2, request_timeout_s=120.0)  # fmt: skip
    shm_before = _ours_in_shm()
    with EPDCluster.launch(model_dir, config) as cluster:
        template = TEMPLATE.replace("PH", cluster.pre.adapter.image_placeholder)
        app = build_app(cluster, ServeSettings(served_model_name="m", chat_template=template))
        with BackgroundServer(app) as server:
            warm = [("good", c) for _, c in _requests(args.warmup, args, rng)]
            asyncio.run(_drive(server.url, warm, args, lambda: None))
            _settled(cluster, 60.0)
            gc.collect()
            rss0, fds0 = _rss_bytes(), _open_fds()
            plan = _requests(args.num_requests, args, rng)
            killed = []

            def kill() -> None:
                if args.kill:
                    os.kill(cluster.worker_pids()[args.kill], signal.SIGKILL)
                    killed.append(args.kill)

            start = time.perf_counter()
            outcomes = asyncio.run(_drive(server.url, plan, args, kill))
            wall = time.perf_counter() - start
            in_use = _settled(cluster, 120.0)
            restarts = {n: w["restarts"] for n, w in cluster.load()["workers"].items()}
            gc.collect()
            rss1, fds1 = _rss_bytes(), _open_fds()
    shm_after = [n for n in _ours_in_shm() if n not in shm_before]
    if tmp is not None:
        tmp.cleanup()
    counts = Counter(f"{kind}/{outcome}" for kind, outcome, _ in outcomes)
    unexpected = [(kind, detail) for kind, outcome, detail in outcomes if outcome == "unexpected"]
    # The reasons given, digits dropped so that one cause counts once ("req-17" -> "req-").
    reasons = Counter(
        re.sub(r"\d+", "", detail)[:160] for _, outcome, detail in outcomes if outcome == "failed"
    )
    answered = len(outcomes) - len(unexpected)
    extra = {"outcomes": dict(counts), "unexpected": unexpected[:20], "killed": killed,
             "failure_reasons": dict(reasons.most_common(8)),
             "restarts": restarts, "blocks_in_use": in_use, "shm_left": shm_after,
             "wall_s": wall, "requests": len(outcomes), "mode": args.mode}  # fmt: skip
    case = f"{len(outcomes)} req, {args.bad_images:.0%} bad, {args.disconnects:.0%} gone" + (
        f", {args.kill} killed" if args.kill else "")  # fmt: skip
    total_in_use = float(sum(in_use.values()))
    for outcome, n in sorted(counts.items()):
        print(f"{outcome}: {n}", file=sys.stderr)
    return [
        Record("soak", case, "answered fraction", answered / len(outcomes), "every request",
               1.0, answered / len(outcomes), extra=extra),
        Record("soak", case, "blocks in use after", total_in_use, "none", 0.0,
               1.0 if total_in_use == 0 else 0.0, extra=extra),
        Record("soak", case, "server RSS bytes", float(rss1), "after warm-up", float(rss0),
               rss0 / rss1, extra=extra),
        Record("soak", case, "server open fds", float(fds1), "after warm-up", float(fds0),
               fds0 / fds1, extra=extra),
    ]  # fmt: skip
