# SPDX-License-Identifier: Apache-2.0
"""``epdrt serve``: the OpenAI-compatible server over a real cluster (tiny LLaVA).

Answers equal the cluster's own for the same prompt; streamed text adds up to the non-streamed
text; every kind of bad input is a 4xx with an OpenAI error body and harms no other request; a
client that goes away aborts its request; the CLI stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from model_utils import CHAT_TEMPLATE, make_image, png_bytes
from serve_cases import (
    MAX_BODY_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MODEL,
    bad_requests,
    chat_body,
    data_url,
)

from epdrt.runtime import EPDCluster, EPDConfig
from epdrt.runtime import Request as ClusterRequest
from epdrt.serve.app import ServeSettings, build_app
from epdrt.serve.background import BackgroundServer

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    config = EPDConfig(mode="epd", max_images_per_request=MAX_IMAGES,
                       max_image_pixels=MAX_IMAGE_PIXELS, stats_interval_s=0.2,
                       request_timeout_s=TIMEOUT_S)  # fmt: skip
    with EPDCluster.launch(tiny_model_dir("llava"), config) as c:
        yield c


def settings(**changes) -> ServeSettings:
    base = {"served_model_name": MODEL, "chat_template": CHAT_TEMPLATE}
    return ServeSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "cat.png").write_bytes(png_bytes(make_image(40, 30, 5)))
    s = BackgroundServer(
        build_app(cluster, settings(allowed_media=media, max_body_bytes=MAX_BODY_BYTES))
    )
    s.media = media
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c:
        yield c


def stream_events(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    events = []
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok", "dead_workers": []}
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] > 0


def test_a_chat_answer_is_the_clusters_answer_for_the_rendered_prompt(client, cluster):
    image = png_bytes(make_image(40, 30, 1))
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": data_url(image)}}]  # fmt: skip
    resp = client.post("/v1/chat/completions", json=chat_body(content))
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    prompt = "user: what is this <image> \nassistant:"
    direct = cluster.submit(ClusterRequest(prompt, [image], 8)).result(TIMEOUT_S)
    assert direct.error is None
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": direct.text}
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["completion_tokens"] == len(direct.token_ids)
    assert usage["prompt_tokens"] == direct.prompt_tokens > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_text_adds_up_to_the_answer(client, path):
    if path.endswith("chat/completions"):
        body = chat_body("tell me a story about a cat", max_tokens=12, ignore_eos=True)
    else:
        body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": 12, "ignore_eos": True}
    whole = client.post(path, json=body).json()
    events = stream_events(client, path, {**body, "stream": True,
                                           "stream_options": {"include_usage": True}})  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    if path.endswith("chat/completions"):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert whole["choices"][0]["message"]["content"] == text
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert whole["choices"][0]["text"] == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert usage["usage"]["completion_tokens"] == 12


def test_a_stop_string_cuts_streamed_and_whole_answers_alike(client):
    body = chat_body("tell me a story about a cat", max_tokens=12, ignore_eos=True)
    text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) > 3
    stop = " ".join(words[2:4])
    body["stop"] = [stop]
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["content"] == text[: text.index(stop)]
    assert whole["finish_reason"] == "stop"
    events = stream_events(client, "/v1/chat/completions", {**body, "stream": True})
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == whole["message"]["content"]


def test_a_local_file_under_the_allowed_path_is_read(client, server):
    url = (server.media / "cat.png").as_uri()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    assert client.post("/v1/chat/completions", json=chat_body(content)).status_code == 200


@pytest.mark.parametrize("case", list(bad_requests(None)))
def test_bad_input_is_a_4xx_with_an_error_body(client, server, case):
    body, status = bad_requests(server.media)[case]
    if isinstance(body, bytes):
        resp = client.post("/v1/chat/completions", content=body,
                           headers={"content-type": "application/json"})  # fmt: skip
    else:
        resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status
    # ... and the server goes on serving.
    assert client.post("/v1/chat/completions", json=chat_body("hi")).status_code == 200


def test_api_key_no_template_and_a_full_queue(cluster):
    app = build_app(cluster, settings(api_key="s3cret", chat_template=None, max_queued=0))
    s = BackgroundServer(app)
    try:
        with httpx.Client(base_url=s.url, timeout=TIMEOUT_S) as c:
            assert c.post("/v1/chat/completions", json=chat_body("hi")).status_code == 401
            wrong = {"authorization": "Bearer nope"}
            assert c.get("/v1/models", headers=wrong).status_code == 401
            assert c.get("/health").status_code == 200  # not behind the key
            key = {"authorization": "Bearer s3cret"}
            resp = c.post("/v1/chat/completions", json=chat_body("hi"), headers=key)
            assert resp.status_code == 400 and "chat template" in resp.json()["error"]["message"]
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            resp = c.post("/v1/completions", json=body, headers=key)
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    finally:
        s.stop()


def _count(client, outcome: str) -> float:
    prefix = f'epdrt_requests_total{{outcome="{outcome}"}} '
    lines = [x for x in client.get("/metrics").text.splitlines() if x.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_client_that_goes_away_aborts_its_request(client, cluster):
    # ~470 tokens take the tiny model about half a second: a loaded host may let one run to
    # its end before the server sees the client gone, so up to three tries.
    body = chat_body("a long answer please", max_tokens=470, ignore_eos=True, stream=True)
    before = _count(client, "aborted")
    for _ in range(3):
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
        deadline = time.monotonic() + TIMEOUT_S
        while cluster.load()["inflight"]:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.05)
        if _count(client, "aborted") > before:
            break
    assert _count(client, "aborted") == before + 1
    time.sleep(0.5)  # a live report after the abort
    metrics = client.get("/metrics").text
    in_use = [
        line for line in metrics.splitlines() if line.startswith("epdrt_worker_kv_blocks_in_use")
    ]
    assert in_use and all(line.endswith(" 0.0") for line in in_use), in_use


def _gauge(text: str, name: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[-1])


def test_metrics_report_requests_latencies_workers_queues_and_links(client):
    image = png_bytes(make_image(40, 30, 77))
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
               {"type": "text", "text": "what is it?"}]  # fmt: skip
    assert client.post("/v1/chat/completions", json=chat_body(content)).status_code == 200
    time.sleep(0.5)  # a live report after the request
    text = client.get("/metrics").text
    for name in ('epdrt_requests_total{outcome="ok"}', "epdrt_time_to_first_token_seconds_bucket",
                 "epdrt_time_per_output_token_seconds_count", "epdrt_e2e_request_latency_seconds",
                 'epdrt_worker_up{worker="d0"} 1.0', "epdrt_router_queued_requests",
                 'epdrt_worker_mm_hit_rate{worker="e0"}'):  # fmt: skip
        assert name in text, name
    # Queue depths per stage: all idle once the request is answered.
    for name in ('epdrt_worker_encode_queued_images{worker="e0"}',
                 'epdrt_worker_prefill_queued{worker="p0"}',
                 'epdrt_worker_decode_queued{worker="d0"}',
                 'epdrt_worker_decode_running{worker="d0"}'):  # fmt: skip
        assert _gauge(text, name) == 0.0, name
    assert _gauge(text, 'epdrt_worker_kv_blocks_total{worker="d0"}') > 0
    # Bytes per link: the image's tokens went e0 -> p0, its KV p0 -> d0 (whole blocks).
    mm = _gauge(text, 'epdrt_link_bytes_total{dst="p0",src="e0",what="mm"}')
    kv = _gauge(text, 'epdrt_link_bytes_total{dst="d0",src="p0",what="kv"}')
    assert mm > 0 and kv > 0
    # ... and how they moved: small copies by the submitting thread on this CPU host.
    assert _gauge(text, 'epdrt_link_copies_total{dst="d0",path="host-inline",src="p0",what="kv"}')


def _worker_pids(model_dir: str) -> list[int]:
    """Worker processes (of any cluster) started for ``model_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "epdrt.runtime.worker" in cmd and model_dir in cmd:
            pids.append(int(entry.name))
    return pids


def test_the_cli_serves_and_stops_cleanly_on_sigterm(tmp_path, tiny_model_dir):
    model = str(Path(tiny_model_dir("qwen2-vl")).resolve())
    info = tmp_path / "serve.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "epdrt.cli", "serve", "--model", model, "--mode", "aggregated",
         "--port", "0", "--json", str(info), "--served-model-name", "q"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not info.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        url = json.loads(info.read_text())["url"]
        body = {"model": "q", "prompt": "hello there", "max_tokens": 3}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
        assert _worker_pids(model)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=TIMEOUT_S)[0].decode()
    assert proc.returncode == 0, out
    assert "stopped" in out and not _worker_pids(model)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("epdrt")]
