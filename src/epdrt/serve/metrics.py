# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of a server: requests by outcome, latency histograms, and the cluster's
queues and caches (read from ``EPDCluster.load`` and ``live_stats`` at each scrape).

Names follow vLLM's where one exists (``*_time_to_first_token_seconds``, ...), under the
``epdrt_`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epdrt.runtime.messages import LINK_BYTES, LINK_COPIES
from epdrt.runtime.request import RequestResult

#: Latency buckets (seconds): from a fast decode step to a long request.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0, 120.0)  # fmt: skip
#: Worker counters exported as gauges (their latest live report), by metric name.
WORKER_GAUGES = {
    "kv_blocks_in_use": "KV-cache blocks held",
    "kv_blocks_total": "KV-cache blocks",
    "mm_blocks_in_use": "MM-token cache blocks held",
    "mm_blocks_total": "MM-token cache blocks",
    "mm_hits": "MM-token cache lookups that hit",
    "mm_misses": "MM-token cache lookups that missed",
    "encode_queued_images": "images waiting to be encoded",
    "encode_sending": "images being copied to prefill workers",
    "prefill_queued": "requests waiting for admission to prefill",
    "prefill_admitted": "requests admitted to prefill, waiting for images or KV room",
    "prefill_running": "requests prefilling",
    "prefill_staged": "prefilled requests whose KV waits here for its decoder (pull or push)",
    "decode_queued": "sequences waiting for admission to decode",
    "decode_pulling": "sequences whose KV is being pulled or pushed in",
    "decode_running": "sequences in the running decode batch",
    "images_encoded": "images encoded",
    "decode_tokens": "tokens decoded",
    "decode_preemptions": "sequences preempted for KV room (recomputed)",
    "peak_memory_bytes": "peak memory",
}


class ServerMetrics:
    """The server's registry. ``observe(result)`` once per request answered."""

    def __init__(self, cluster) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "epdrt_requests", "requests answered, by outcome (ok or the error kind)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("epdrt_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter("epdrt_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(
            "epdrt_time_to_first_token_seconds", "time to first token", buckets=BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "epdrt_time_per_output_token_seconds", "mean time per output token after the first",
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "epdrt_e2e_request_latency_seconds", "submission to last token", buckets=BUCKETS,
            registry=r,
        )  # fmt: skip
        self.encode = Histogram(
            "epdrt_encode_seconds", "encoder time spent on a request's images", buckets=BUCKETS,
            registry=r,
        )  # fmt: skip
        r.register(_ClusterCollector(cluster))

    def observe(self, result: RequestResult) -> None:
        self.requests.labels(result.error_kind or "ok").inc()
        if result.error is not None:
            return
        self.prompt_tokens.inc(result.prompt_tokens or 0)
        self.generation_tokens.inc(len(result.token_ids))
        for histogram, value in (
            (self.ttft, result.ttft_s), (self.tpot, result.tpot_s), (self.e2e, result.e2e_s),
        ):  # fmt: skip
            if value is not None:
                histogram.observe(value)
        if result.encode_s:
            self.encode.observe(result.encode_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector(Collector):
    """The cluster's state at scrape time: queues, worker liveness and load, cache use."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self.cluster.load()
        yield GaugeMetricFamily(
            "epdrt_router_queued_requests", "requests waiting in the router's queue",
            value=load["queued"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "epdrt_inflight_requests", "requests in the workers", value=load["inflight"]
        )
        up = GaugeMetricFamily("epdrt_worker_up", "1 while the worker is alive", labels=["worker"])
        busy = GaugeMetricFamily(
            "epdrt_worker_load", "requests (images for an encoder) a worker has in flight",
            labels=["worker", "roles"],
        )  # fmt: skip
        restarts = GaugeMetricFamily(
            "epdrt_worker_restarts", "times a worker was started again after dying",
            labels=["worker"],
        )  # fmt: skip
        for name, w in load["workers"].items():
            up.add_metric([name], 1.0 if w["alive"] else 0.0)
            busy.add_metric([name, "+".join(w["roles"])], w["load"])
            restarts.add_metric([name], w["restarts"])
        yield up
        yield busy
        yield restarts
        live = self.cluster.live_stats()
        for key, help_text in WORKER_GAUGES.items():
            family = GaugeMetricFamily(f"epdrt_worker_{key}", help_text, labels=["worker"])
            for name, counters in live.items():
                if key in counters:
                    family.add_metric([name], counters[key])
            yield family
        hit_rate = GaugeMetricFamily(
            "epdrt_worker_mm_hit_rate", "MM-token cache lookups that hit, of all so far",
            labels=["worker"],
        )  # fmt: skip
        links = CounterMetricFamily(
            "epdrt_link_bytes", "bytes copied between two workers' caches (kv or mm), counted "
            "by the worker that copies", labels=["what", "src", "dst"],
        )  # fmt: skip
        copies = CounterMetricFamily(
            "epdrt_link_copies", "copies between two workers' caches, by how the bytes moved "
            "(host-inline, host-threads, cuda-same-device, cuda-peer-access, cuda-peer-memcpy: "
            "staged through the host)", labels=["what", "src", "dst", "path"],
        )  # fmt: skip
        for name, counters in live.items():
            lookups = counters.get("mm_hits", 0.0) + counters.get("mm_misses", 0.0)
            if lookups:
                hit_rate.add_metric([name], counters["mm_hits"] / lookups)
            for key, value in counters.items():
                if key.startswith(LINK_BYTES):
                    links.add_metric(key[len(LINK_BYTES) :].split("/"), value)
                elif key.startswith(LINK_COPIES):
                    copies.add_metric(key[len(LINK_COPIES) :].split("/"), value)
        yield hit_rate
        yield links
        yield copies
