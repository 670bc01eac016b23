# SPDX-License-Identifier: Apache-2.0
"""The official ``openai`` client against a real ``epdrt serve`` process on a free port (tiny
LLaVA, ``epd``): plain and streamed chat with an image, text-only chat, greedy text equal to
``generate()`` on the rendered prompt, concurrent requests, a disconnect, every kind of bad
input (``serve_cases``: the same as the in-process server's), auth, and ``/metrics`` read with
``prometheus-client``'s own parser."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from model_utils import CHAT_TEMPLATE, make_image, png_bytes, reference_tokens
from prometheus_client.parser import text_string_to_metric_families
from serve_cases import MAX_BODY_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES, MODEL, bad_requests

from epdrt.models import load_adapter

TIMEOUT_S = 120.0
KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``(url, model_dir)`` of an ``epdrt serve`` process; stopped with SIGTERM after."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "template.jinja").write_text(CHAT_TEMPLATE)
    model = tiny_model_dir("llava")
    limits = {"mode": "epd", "max_images_per_request": MAX_IMAGES,
              "max_image_pixels": MAX_IMAGE_PIXELS}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "epdrt.cli", "serve", "--model", model, "--port", "0",
         "--json", str(tmp / "info.json"), "--chat-template", str(tmp / "template.jinja"),
         "--served-model-name", MODEL, "--api-key", KEY, "--config", json.dumps(limits),
         "--max-body-mib", str(MAX_BODY_BYTES / (1 << 20))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp / "info.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    yield json.loads((tmp / "info.json").read_text())["url"], model
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=TIMEOUT_S)[0].decode()
    assert proc.returncode == 0, out


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, timeout=TIMEOUT_S)


def image_part(seed: int) -> dict:
    data = base64.b64encode(png_bytes(make_image(40, 30, seed))).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def test_chat_with_an_image_gives_the_greedy_text_of_generate(client, server):
    content = [{"type": "text", "text": "what is in the picture"}, image_part(1)]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8
    )
    adapter = load_adapter(server[1])
    prompt = "user: what is in the picture <image> \nassistant:"
    prepared = adapter.prepare(prompt, [png_bytes(make_image(40, 30, 1))])
    want = adapter.detokenize(reference_tokens(adapter, [prepared], 8)[0])
    assert answer.choices[0].message.content == want
    assert answer.usage.prompt_tokens == prepared.num_tokens
    assert answer.model == MODEL and answer.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_with_an_image_adds_up_to_the_plain_answer(client):
    messages = [{"role": "user", "content": [image_part(2), {"type": "text", "text": "and?"}]}]
    extra = {"ignore_eos": True}
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, extra_body=extra
    )
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, extra_body=extra, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 10


def test_text_only_chat_and_concurrent_requests(client):
    def ask(i: int) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=6
        )
        return answer.choices[0].message.content

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone  # greedy: the batch a request lands in changes nothing


def test_a_disconnected_stream_is_aborted(client, server):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go on and on"}], max_tokens=400,
        extra_body={"ignore_eos": True}, stream=True,
    )  # fmt: skip
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        families = _metrics(server[0])
        aborted = families["epdrt_requests"].get(("outcome", "aborted"), 0)
        inflight = families["epdrt_inflight_requests"][()]
        if aborted >= 1 and inflight == 0:
            break
        assert time.monotonic() < deadline, (aborted, inflight)
        time.sleep(0.1)


@pytest.mark.parametrize("case", list(bad_requests(None)))
def test_bad_input_is_an_openai_error_and_harms_nothing(client, server, case):
    body, status = bad_requests(None)[case]
    if isinstance(body, bytes):  # not JSON: the client cannot send it
        resp = httpx.post(f"{server[0]}/v1/chat/completions", content=body, timeout=TIMEOUT_S,
                          headers={"authorization": f"Bearer {KEY}",
                                   "content-type": "application/json"})  # fmt: skip
        assert resp.status_code == status
        error = resp.json()["error"]
    else:
        with pytest.raises(openai.APIStatusError) as caught:
            client.post("/chat/completions", body=body, cast_to=httpx.Response)
        assert caught.value.status_code == status
        error = caught.value.body
    assert error["message"] and error["type"] and error["code"] == status
    if case == "file outside":  # no --allowed-local-media-path: file:// is off
        assert "allowed-local-media-path" in error["message"]
    # ... and the server goes on serving.
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.usage.completion_tokens >= 1


def test_auth_and_the_model_list(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="nope", timeout=TIMEOUT_S)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_metrics_parse_with_prometheus_clients_parser(client, server):
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    families = _metrics(server[0])
    assert families["epdrt_requests"][("outcome", "ok")] >= 1
    assert families["epdrt_time_to_first_token_seconds"]
    assert families["epdrt_worker_up"] == {("worker", w): 1.0 for w in ("e0", "p0", "d0")}


def _metrics(url: str) -> dict[str, dict[tuple, float]]:
    """Each family's samples (first label pair, or () without labels -> value); histogram
    families map their ``_count`` sample."""
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            if family.type == "histogram" and not s.name.endswith("_count"):
                continue
            if family.type == "counter" and not s.name.endswith("_total"):
                continue
            label = next(iter(sorted(s.labels.items())), ())
            samples[label] = s.value
    return out
