# SPDX-License-Identifier: Apache-2.0
"""Load generator for an OpenAI-compatible server: Poisson arrivals of streamed chat requests.

Each request streams (``stream_options.include_usage``); the client clocks TTFT (first
content), TPOT ((end - first) / (output tokens - 1)), inter-token latency and end-to-end
latency. The summary's names follow ``vllm bench serve`` (``request_throughput``,
``mean_ttft_ms``, ``p99_tpot_ms``, ``request_goodput``, ...), so numbers compare directly.

Two ways to run it:
- ``--url URL``: against a running server (``epdrt serve`` or any OpenAI-compatible one).
- ``--model DIR``: launches a cluster, runs the workload through ``EPDCluster.submit`` in this
  process, then through ``epdrt serve``'s app on the same cluster over loopback HTTP, and
  reports the server's overhead (TTFT p50 through HTTP minus in-process; target: at most 3 ms
  on a CPU at 8 req/s).

Workload: ``--requests FILE.jsonl`` (``{"prompt", "images": [paths], "max_tokens"}`` per
line) or ``--synthetic`` (``--prompt-tokens`` random words, ``--images-per-request LO,HI``
random PNGs sent as data: URLs, ``--max-tokens``). Records (JSON lines) per metric; a PNG of
the latency distributions with ``--plot``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from epdrt.benchmarking import Record

if TYPE_CHECKING:
    import httpx

HELP = "Poisson load over HTTP (OpenAI API, streamed): TTFT/TPOT/E2E, throughput, goodput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server's base URL")
    target.add_argument("--model", help="model directory: launch a cluster and its server here")
    parser.add_argument("--mode", default="epd", help="with --model: epd, pd or aggregated")
    parser.add_argument("--served-model-name", help="the model name to send (default: asked)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    work = parser.add_mutually_exclusive_group()
    work.add_argument("--requests", help="JSONL workload file")
    work.add_argument("--synthetic", action="store_true", help="random prompts and images")
    parser.add_argument("--images-per-request", default="1,1", help="LO,HI (synthetic)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="words per prompt")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image side (px)")
    parser.add_argument("--rate", type=float, default=8.0, help="requests/s (inf: all at once)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO, seconds (goodput)")
    parser.add_argument("--slo-tpot", type=float, help="TPOT SLO, seconds (goodput)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write a PNG of the latency distributions here")


@dataclass
class Outcome:
    """One request as the client saw it (seconds; ``error`` set when it failed)."""

    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _png(size: int, rng: random.Random) -> bytes:
    pixels = np.frombuffer(rng.randbytes(size * size * 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.reshape(size, size, 3), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _content(prompt: str, images: list[bytes]) -> list[dict]:
    parts: list[dict] = [
        {"type": "image_url",
         "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()}}
        for b in images
    ]  # fmt: skip
    return [*parts, {"type": "text", "text": prompt}]


def workload(args: argparse.Namespace) -> list[tuple[list[dict], int]]:
    """Each request's message content and max_tokens."""
    rng = random.Random(args.seed)
    if args.requests:
        out = []
        base = Path(args.requests).parent
        for line in Path(args.requests).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            images = [(base / p).read_bytes() for p in row.get("images", [])]
            out.append((_content(row["prompt"], images), int(row.get("max_tokens", 16))))
        return (out * (args.num_requests // max(len(out), 1) + 1))[: args.num_requests]
    lo, hi = (int(x) for x in args.images_per_request.split(","))
    words = ["cat", "dog", "tree", "river", "house", "light", "stone", "cloud", "bird", "road"]
    out = []
    for _ in range(args.num_requests):
        prompt = " ".join(rng.choice(words) for _ in range(args.prompt_tokens))
        images = [_png(args.image_size, rng) for _ in range(rng.randint(lo, hi))]
        out.append((_content(prompt, images), args.max_tokens))
    return out


async def _one(client: httpx.AsyncClient, model: str, content: list[dict], max_tokens: int
               ) -> Outcome:  # fmt: skip
    import httpx

    from epdrt.serve.client import chat_stream_body, sse_events

    body = chat_stream_body(model, content, max_tokens)
    out = Outcome()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return out
            async for event in sse_events(resp):
                if "error" in event:
                    out.error = event["error"]["message"]
                    return out
                if event.get("usage"):
                    out.output_tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if out.ttft is None:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
        out.e2e = time.perf_counter() - start
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def drive(url: str, model: str, items, rate: float, seed: int, headers: dict) -> tuple[
        list[Outcome], float]:  # fmt: skip
    """Sends ``items`` with Poisson arrivals at ``rate``; returns outcomes and wall seconds."""
    import httpx

    from epdrt.serve.client import client_limits

    rng = random.Random(seed)
    limits = client_limits()
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits,
                                 headers=headers) as client:  # fmt: skip
        tasks = []
        start = time.perf_counter()
        for i, (content, max_tokens) in enumerate(items):
            tasks.append(asyncio.create_task(_one(client, model, content, max_tokens)))
            if rate != float("inf") and i + 1 < len(items):
                await asyncio.sleep(rng.expovariate(rate))
            print(f"\rsent {i + 1}/{len(items)}", end="", file=sys.stderr)
        outcomes = []
        for n, task in enumerate(asyncio.as_completed(tasks), 1):
            outcomes.append(await task)
            print(f"\rdone {n}/{len(items)}  ", end="", file=sys.stderr)
        print(file=sys.stderr)
        return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall_s: float, slo_ttft: float | None,
              slo_tpot: float | None) -> dict[str, float | int | None]:  # fmt: skip
    """vLLM-style summary (milliseconds for latencies)."""
    ok = [o for o in outcomes if o.error is None]

    def stats(name: str, values: list[float]) -> dict[str, float | None]:
        ms = [v * 1e3 for v in values]
        return {
            f"mean_{name}_ms": statistics.fmean(ms) if ms else None,
            f"median_{name}_ms": float(np.percentile(ms, 50)) if ms else None,
            f"p90_{name}_ms": float(np.percentile(ms, 90)) if ms else None,
            f"p99_{name}_ms": float(np.percentile(ms, 99)) if ms else None,
        }

    out: dict[str, float | int | None] = {
        "successful_requests": len(ok),
        "failed_requests": len(outcomes) - len(ok),
        "benchmark_duration_s": wall_s,
        "total_output_tokens": sum(o.output_tokens for o in ok),
        "request_throughput": len(ok) / wall_s,
        "output_throughput": sum(o.output_tokens for o in ok) / wall_s,
        **stats("ttft", [o.ttft for o in ok if o.ttft is not None]),
        **stats("tpot", [o.tpot for o in ok if o.tpot is not None]),
        **stats("itl", [x for o in ok for x in o.itl]),
        **stats("e2el", [o.e2e for o in ok if o.e2e is not None]),
    }
    if slo_ttft is not None or slo_tpot is not None:
        good = [
            o for o in ok
            if (slo_ttft is None or (o.ttft or 0) <= slo_ttft)
            and (slo_tpot is None or o.tpot is None or o.tpot <= slo_tpot)
        ]  # fmt: skip
        out["request_goodput"] = len(good) / wall_s
    return out


def _plot(path: str, runs: dict[str, list[Outcome]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, get) in zip(axes, (("TTFT", lambda o: o.ttft), ("TPOT", lambda o: o.tpot),
                                      ("E2E latency", lambda o: o.e2e))):  # fmt: skip
        for label, outcomes in runs.items():
            values = sorted(get(o) * 1e3 for o in outcomes if o.error is None and get(o))
            if values:
                ax.plot(values, np.linspace(0, 1, len(values)), label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _model_name(url: str, headers: dict) -> str:
    import httpx

    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30.0).json()
    return models["data"][0]["id"]


def run(args: argparse.Namespace) -> list[Record]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:
        model = args.served_model_name or _model_name(args.url, headers)
        items = workload(args)
        outcomes, wall = asyncio.run(drive(args.url, model, items, args.rate, args.seed, headers))
        summary = summarize(outcomes, wall, args.slo_ttft, args.slo_tpot)
        if args.plot:
            _plot(args.plot, {"http": outcomes})
        return _records(summary, None, args)
    return _with_cluster(args)


def _with_cluster(args: argparse.Namespace) -> list[Record]:
    """The same workload in-process and over HTTP on one cluster: the server's overhead."""
    from epdrt.runtime import EPDCluster, EPDConfig
    from epdrt.serve.app import ServeSettings, build_app
    from epdrt.serve.background import BackgroundServer

    items = workload(args)
    # Both sides send the same prompt: the images' placeholders, then the text.
    template = (
        "{% for m in messages %}{% for p in m.content %}{% if p.type == 'image' %}"
        "{{ placeholder }} {% else %}{{ p.text }}{% endif %}{% endfor %}{% endfor %}"
    )
    config = EPDConfig(mode=args.mode)
    with EPDCluster.launch(args.model, config) as cluster:
        placeholder = cluster.pre.adapter.image_placeholder
        chat = template.replace("{{ placeholder }}", placeholder)
        inproc = _in_process(cluster, items, placeholder, args.rate, args.seed)
        settings = ServeSettings(served_model_name="m", chat_template=chat)
        with BackgroundServer(build_app(cluster, settings)) as server:
            outcomes, wall = asyncio.run(drive(server.url, "m", items, args.rate, args.seed, {}))
    http = summarize(outcomes, wall, args.slo_ttft, args.slo_tpot)
    base = summarize(*inproc, args.slo_ttft, args.slo_tpot)
    if args.plot:
        _plot(args.plot, {"http": outcomes, "in-process": inproc[0]})
    return _records(http, base, args)


def _in_process(cluster, items, placeholder: str, rate: float, seed: int) -> tuple[
        list[Outcome], float]:  # fmt: skip
    """The workload through ``EPDCluster.submit``, with the same arrivals and token clock."""
    from epdrt.runtime import Request
    from epdrt.runtime.sampling import SamplingParams

    rng = random.Random(seed)
    greedy_to_the_end = SamplingParams(ignore_eos=True)
    outcomes = [Outcome() for _ in items]
    futures = []
    start = time.perf_counter()
    for i, (content, max_tokens) in enumerate(items):
        images = [base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                  for p in content if p["type"] == "image_url"]  # fmt: skip
        text = " ".join(p["text"] for p in content if p["type"] == "text")
        prompt = " ".join([placeholder] * len(images) + [text])
        sent = time.perf_counter()

        def on_token(_, __, o=outcomes[i], t0=sent) -> None:
            now = time.perf_counter()
            if o.ttft is None:
                o.ttft = now - t0
            o.e2e = now - t0
            o.output_tokens += 1

        request = Request(prompt, images, max_tokens, sampling=greedy_to_the_end)
        futures.append(cluster.submit(request, on_token=on_token))
        if rate != float("inf") and i + 1 < len(items):
            time.sleep(rng.expovariate(rate))
    for outcome, future in zip(outcomes, futures):
        result = future.result()
        outcome.error = result.error
    return outcomes, time.perf_counter() - start


def _records(summary: dict, base: dict | None, args: argparse.Namespace) -> list[Record]:
    case = f"rate{args.rate:g}-n{args.num_requests}"
    extra = {"rate": args.rate, "num_requests": args.num_requests, "summary": summary}
    records = []
    for metric in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_e2el_ms",
                   "request_throughput", "output_throughput"):  # fmt: skip
        value = summary.get(metric)
        if value is None:
            continue
        if base is not None and base.get(metric):
            lower_better = metric.endswith("_ms")
            ratio = base[metric] / value if lower_better else value / base[metric]
            records.append(Record("serve", case, metric, value, "EPDCluster.submit",
                                  base[metric], ratio, extra=extra))  # fmt: skip
        else:
            records.append(Record("serve", case, metric, value, "none", value, 1.0, extra=extra))
    if base is not None and summary.get("median_ttft_ms") and base.get("median_ttft_ms"):
        overhead = summary["median_ttft_ms"] - base["median_ttft_ms"]
        print(f"server overhead: TTFT p50 {overhead:+.2f} ms over in-process", file=sys.stderr)
        extra["ttft_p50_overhead_ms"] = overhead
    failed = summary.get("failed_requests", 0)
    print(f"{summary['successful_requests']} ok, {failed} failed", file=sys.stderr)
    return records
