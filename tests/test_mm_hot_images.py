# SPDX-License-Identifier: Apache-2.0
"""No hold-and-wait between the MM caches: with a hot set of images as large as the caches,
an encoder's cache fills with holds of hot images for requests whose turn has not come (not
admitted by the prefill in epd; waiting for their other image in pd). The oldest wanted image
must still be encoded (it takes those holds), so every request completes with the tokens of
``generate()`` and none times out."""

from __future__ import annotations

import pytest
from model_utils import make_image, reference_tokens

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request

SLOTS = 3  # images either MM cache holds (one 16-token block each)
NUM_REQUESTS = 12
MAX_NEW = 2
TIMEOUT_S = 60.0  # far more than this workload needs; a wedged request fails by then


def _requests(ph: str, num_hot: int) -> list[Request]:
    """Request i: its own image, then hot image i % num_hot; all arrive together."""
    hot = [make_image(40, 30, 1000 + h) for h in range(num_hot)]
    return [
        Request(f"{ph} then {ph} {i}", [make_image(40, 30, i), hot[i % num_hot]], MAX_NEW)
        for i in range(NUM_REQUESTS)
    ]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return load_adapter(tiny_model_dir("llava"))


def _expected(adapter, requests: list[Request]) -> dict[str, list[int]]:
    out = {}
    for r in requests:
        prepared = adapter.prepare(r.prompt, r.images)
        out[r.id] = reference_tokens(adapter, [prepared], r.max_new_tokens)[0]
    return out


@pytest.mark.parametrize(
    "mode, num_encode", [("epd", 1), ("epd", 2), ("pd", 1)], ids=["1E1P", "2E1P", "1EP"]
)
def test_hot_images_in_full_caches_never_wedge_a_request(mode, num_encode, tiny_model_dir, adapter):
    """As many hot images as all encoders' caches hold."""
    requests = _requests(adapter.spec.image_placeholder, SLOTS * num_encode)
    expected = _expected(adapter, requests)
    config = EPDConfig(
        mode=mode, num_encode=num_encode, mm_cache_tokens=SLOTS * 16, mm_block_size=16,
        request_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        results = cluster.generate(requests)
    assert {r.id: r.error for r in results} == {rid: None for rid in expected}
    assert {r.id: r.token_ids for r in results} == expected
    stats = cluster.worker_stats()
    encoders = [f"e{i}" for i in range(num_encode)] if mode == "epd" else ["ep0"]
    # The scenario happened: wanted images took holds of hot images wanted later.
    assert sum(stats[e].get("mm_holds_preempted", 0) for e in encoders) > 0
