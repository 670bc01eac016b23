# SPDX-License-Identifier: Apache-2.0
"""No hold-and-wait between the MM caches: with a hot set of images as large as the caches,
the encoder's cache fills with holds of hot images for requests the prefill has not admitted
yet; an admitted request's own image must still be encoded (it takes those holds), so every
request completes with the tokens of ``generate()`` and none times out."""

from __future__ import annotations

import pytest
from model_utils import make_image, reference_tokens

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request

HOT = 3  # hot images: as many as either MM cache holds (one 16-token block each)
NUM_REQUESTS = 12
MAX_NEW = 2
TIMEOUT_S = 60.0  # far more than this workload needs; a wedged request fails by then


def _requests(ph: str) -> list[Request]:
    """Request i: its own image, then hot image i % HOT; all arrive together."""
    hot = [make_image(40, 30, 1000 + h) for h in range(HOT)]
    return [
        Request(f"{ph} then {ph} {i}", [make_image(40, 30, i), hot[i % HOT]], MAX_NEW)
        for i in range(NUM_REQUESTS)
    ]


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> dict[str, list[int]]:
    adapter = load_adapter(tiny_model_dir("llava"))
    out = {}
    for r in _requests(adapter.spec.image_placeholder):
        prepared = adapter.prepare(r.prompt, r.images)
        out[r.id] = reference_tokens(adapter, [prepared], r.max_new_tokens)[0]
    return out


@pytest.mark.parametrize("num_encode", [1, 2], ids=["1E1P", "2E1P"])
def test_hot_images_in_full_caches_never_wedge_a_request(num_encode, tiny_model_dir, expected):
    model = tiny_model_dir("llava")
    config = EPDConfig(
        mode="epd", num_encode=num_encode, mm_cache_tokens=HOT * 16, mm_block_size=16,
        request_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    with EPDCluster.launch(model, config) as cluster:
        requests = _requests(cluster.pre.placeholder)
        for r, rid in zip(requests, expected):
            r.id = rid
        results = cluster.generate(requests)
    assert {r.id: r.error for r in results} == {rid: None for rid in expected}
    assert {r.id: r.token_ids for r in results} == expected
