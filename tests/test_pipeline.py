# SPDX-License-Identifier: Apache-2.0
"""The disaggregated pipeline: separate encode / prefill / decode processes give exactly the
tokens of ``model.generate``, in every mode, for both architectures."""

from __future__ import annotations

import pytest
from model_utils import make_image, png_bytes, reference_tokens

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request

ARCHS = ["llava", "qwen2-vl"]
MODES = ["epd", "pd", "aggregated"]
MAX_NEW = 6
TIMEOUT_S = 120.0  # a stuck request fails with a reason before pytest-timeout hits


def _workload(ph: str) -> tuple[Request, list[Request]]:
    """One single-image request (alone), then a mixed batch of 9 arriving together."""
    shared = make_image(48, 36, 100)  # in several requests: encoded once
    single = Request(f"USER: {ph}\nDescribe. ASSISTANT:", [make_image(40, 30, 1)], MAX_NEW)
    batch = [
        Request(f"{ph} and {ph} and {ph}", [make_image(64, 48, s) for s in (2, 3, 4)], MAX_NEW),
        Request("text only, no picture at all", [], MAX_NEW),
        Request(f"first {ph}", [shared], MAX_NEW),
        Request(f"second {ph} again", [png_bytes(shared)], MAX_NEW),
        Request(f"{ph}{ph} pair", [make_image(30, 70, 5), shared], 3),
        Request(f"tall {ph}", [make_image(20, 90, 6)], MAX_NEW),
        Request("another text request", [], 1),
        Request(f"{ph} wide", [make_image(120, 24, 7)], MAX_NEW),
        Request(f"{ph} last one", [make_image(50, 50, 8)], MAX_NEW),
    ]
    return single, batch


def _expected(adapter, requests: list[Request]) -> dict[str, list[int]]:
    out = {}
    for r in requests:
        prepared = adapter.prepare(r.prompt, r.images)
        out[r.id] = reference_tokens(adapter, [prepared], r.max_new_tokens)[0]
    return out


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    refs = {}
    for arch in ARCHS:
        adapter = load_adapter(tiny_model_dir(arch))
        single, batch = _workload(adapter.spec.image_placeholder)
        refs[arch] = (adapter.spec.image_placeholder, _expected(adapter, [single, *batch]))
    return refs


def _fresh(ph: str, expected_ids: list[str]) -> tuple[Request, list[Request]]:
    """The workload again with the ids the references were computed for."""
    single, batch = _workload(ph)
    for r, rid in zip([single, *batch], expected_ids):
        r.id = rid
    return single, batch


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_equal_generate(arch, mode, tiny_model_dir, references):
    ph, expected = references[arch]
    single, batch = _fresh(ph, list(expected))
    with EPDCluster.launch(
        tiny_model_dir(arch), EPDConfig(mode=mode, request_timeout_s=TIMEOUT_S)
    ) as cluster:
        streamed: list[int] = []
        future = cluster.submit(single, on_token=lambda _, token: streamed.append(token))
        first = future.result(timeout=TIMEOUT_S)
        results = cluster.generate(batch)
    assert streamed == first.token_ids  # tokens stream as they are generated
    for r in [first, *results]:
        assert r.error is None, r.error
        assert r.token_ids == expected[r.id], r.id
        assert r.ttft_s is not None and r.ttft_s > 0
        assert r.text == cluster.pre.decode(r.token_ids)
    stats = cluster.worker_stats()
    encoded = sum(s.get("images_encoded", 0) for s in stats.values())
    distinct = {
        cluster.pre.adapter.preprocess_image(im).content_key
        for r in [single, *batch]
        for im in r.images
    }
    assert encoded == len(distinct)  # a repeated image is encoded once


@pytest.mark.parametrize("handoff", ["layerwise", "pull"])
def test_both_kv_handoffs_give_the_tokens_of_generate(tiny_model_dir, references, handoff):
    ph, expected = references["qwen2-vl"]
    single, batch = _fresh(ph, list(expected))
    config = EPDConfig(mode="epd", kv_handoff=handoff, request_timeout_s=TIMEOUT_S)
    with EPDCluster.launch(tiny_model_dir("qwen2-vl"), config) as cluster:
        results = cluster.generate([single, *batch])
    assert {r.id: r.token_ids for r in results} == expected
    stats = cluster.worker_stats()
    assert stats["d0"]["kv_handoffs"] == sum(len(tokens) > 1 for tokens in expected.values())
    copier = "p0" if handoff == "layerwise" else "d0"  # the side that copies counts the bytes
    assert stats[copier]["link_bytes/kv/p0/d0"] > 0
    assert stats["d0"]["kv_blocks_in_use"] == stats["p0"]["kv_blocks_in_use"] == 0


def test_a_signed_tcp_control_plane_gives_the_tokens_of_generate(tiny_model_dir, references):
    ph, expected = references["llava"]
    single, batch = _fresh(ph, list(expected))
    config = EPDConfig(mode="epd", control="tcp", request_timeout_s=TIMEOUT_S)
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        results = cluster.generate([single, *batch])
        secret = cluster._secret.hex()
        for pid in cluster.worker_pids().values():  # the secret is not on a command line
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert secret.encode() not in f.read()
    assert {r.id: r.token_ids for r in results} == expected
    stats = cluster.worker_stats()
    assert {w: s["control_messages_rejected"] for w, s in stats.items()} == dict.fromkeys(stats, 0)


def test_images_split_across_encoders(tiny_model_dir, references):
    ph, expected = references["llava"]
    single, batch = _fresh(ph, list(expected))
    config = EPDConfig(
        mode="epd", num_encode=2, num_prefill=1, num_decode=2, request_timeout_s=TIMEOUT_S
    )
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        results = cluster.generate([single, *batch])
    assert {r.id: r.token_ids for r in results} == expected
    per_encoder = [cluster.worker_stats()[w].get("images_encoded", 0) for w in ("e0", "e1")]
    assert min(per_encoder) > 0  # both encoders worked
    decoded = [cluster.worker_stats()[w].get("decode_tokens", 0) for w in ("d0", "d1")]
    assert min(decoded) > 0


def test_back_pressure_small_caches(tiny_model_dir, references):
    """MM and KV caches that hold about one request at a time: requests queue, none fails."""
    ph, expected = references["llava"]
    single, batch = _fresh(ph, list(expected))
    config = EPDConfig(
        mode="epd", mm_cache_tokens=48, kv_cache_tokens=64, mm_block_size=16,
        request_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        results = cluster.generate([single, *batch])
    assert {r.id: r.token_ids for r in results} == expected
    waits = sum(
        s.get("prefill_admission_waits", 0) + s.get("prefill_kv_waits", 0)
        for s in cluster.worker_stats().values()
    )
    assert waits > 0  # the caches really were the bottleneck


@pytest.mark.parametrize(
    "dev", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)], ids=["cpu", "cuda"]
)
def test_verified_hand_offs_carry_the_producers_bytes(dev, tiny_model_dir, tmp_path):
    """Every image's MM rows and every sequence's KV arrive as the producer wrote them (the
    receivers digest what landed and compare), and the tokens equal ``generate()`` on the same
    device. On a GPU this fails when a copy is not ordered after the work that produced it."""
    model = tiny_model_dir("llava")
    adapter = load_adapter(model, dev)
    single, batch = _workload(adapter.spec.image_placeholder)
    requests = [single, *batch]
    expected = _expected(adapter, requests)
    del adapter
    logs = tmp_path / "logs"
    config = EPDConfig(
        mode="epd", devices=[dev] * 3, verify_transfers=True, request_timeout_s=TIMEOUT_S,
        log_dir=str(logs),
    )  # fmt: skip
    with EPDCluster.launch(model, config) as cluster:
        results = cluster.generate(requests)
    assert {r.id: r.error for r in results} == {r.id: None for r in requests}
    assert {r.id: r.token_ids for r in results} == expected
    stats = cluster.worker_stats()
    checks = {w: s.get("transfer_digest_checks", 0) for w, s in stats.items()}
    assert checks["p0"] == stats["e0"]["images_encoded"] > 0  # each image fetched once
    assert checks["d0"] == sum(1 for r in results if len(r.token_ids) > 1)  # each KV pulled
    assert sum(s.get("transfer_digest_mismatches", 0) for s in stats.values()) == 0
    kept = sorted(p.name.rsplit("-", 1)[1] for p in logs.glob("*.log"))
    assert kept == ["d0.log", "e0.log", "p0.log"]  # worker logs outlive the cluster
