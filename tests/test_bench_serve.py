# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench serve``: the same workload in-process and over HTTP on one cluster, records
with vLLM's metric names and ratios against ``EPDCluster.submit``, and a plot; then against
a running server by URL (a JSONL workload, an API key)."""

import argparse
import json

from model_utils import make_image, png_bytes

from epdrt.bench import BENCHMARKS
from epdrt.bench import serve as bench
from epdrt.runtime import EPDCluster, EPDConfig
from epdrt.serve.app import ServeSettings, build_app
from epdrt.serve.background import BackgroundServer

METRICS = ["median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_e2el_ms",
           "request_throughput", "output_throughput"]  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_in_process_against_http_on_one_cluster(tiny_model_dir, tmp_path):
    args = parse("--model", tiny_model_dir("llava"), "--mode", "pd", "--synthetic",
                 "--images-per-request", "0,2", "--num-requests", "6", "--rate", "20",
                 "--max-tokens", "4", "--slo-ttft", "10", "--slo-tpot", "10",
                 "--plot", str(tmp_path / "serve.png"))  # fmt: skip
    records = bench.run(args)
    assert BENCHMARKS["serve"] is bench
    assert [r.metric for r in records] == METRICS
    for r in records:
        assert r.bench == "serve" and r.baseline == "EPDCluster.submit" and r.value > 0
        assert r.ratio > 0 and r.baseline_value > 0
    summary = records[0].extra["summary"]
    assert summary["successful_requests"] == 6 and summary["failed_requests"] == 0
    assert summary["total_output_tokens"] == 6 * 4 and summary["request_goodput"] > 0
    assert "ttft_p50_overhead_ms" in records[0].extra
    assert (tmp_path / "serve.png").stat().st_size > 1000


def test_against_a_running_server_with_a_request_file(tiny_model_dir, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(make_image(30, 20, 3)))
    lines = [{"prompt": "what is it", "images": ["a.png"], "max_tokens": 3},
             {"prompt": "just text", "max_tokens": 2}]  # fmt: skip
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    template = ("{% for m in messages %}{% for p in m.content %}{% if p.type == 'image' %}"
                "<image> {% else %}{{ p.text }}{% endif %}{% endfor %}{% endfor %}")  # fmt: skip
    with EPDCluster.launch(tiny_model_dir("llava"), EPDConfig(mode="aggregated")) as cluster:
        settings = ServeSettings(served_model_name="m", chat_template=template, api_key="k")
        with BackgroundServer(build_app(cluster, settings)) as server:
            records = bench.run(parse("--url", server.url, "--api-key", "k", "--requests",
                                      str(tmp_path / "w.jsonl"), "--num-requests", "4",
                                      "--rate", "inf"))  # fmt: skip
            denied = bench.run(parse("--url", server.url, "--served-model-name", "m",
                                     "--requests", str(tmp_path / "w.jsonl"),
                                     "--num-requests", "2"))  # fmt: skip
    summary = records[0].extra["summary"]
    assert summary["successful_requests"] == 4 and summary["total_output_tokens"] == 10
    assert all(r.baseline == "none" for r in records)
    assert denied[0].extra["summary"]["failed_requests"] == 2  # no key: 401s, counted
