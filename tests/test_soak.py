# SPDX-License-Identifier: Apache-2.0
"""Soak: 500 requests with random aborts, corrupt images and oversize requests through an
``epd`` deployment with small caches. Every request is answered, every cache ends with no
block in use, and the greedy tokens of the untouched requests equal ``generate()``."""

from __future__ import annotations

import random
import threading

import pytest
from model_utils import make_image, png_bytes, reference_tokens

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request

REQUESTS = 500
TIMEOUT_S = 240.0


def _shapes(ph: str) -> list[tuple[str, list[bytes], int]]:
    """Distinct good requests (prompt, images as PNG bytes, max_new_tokens); a hot set of
    images recurs across them."""
    hot = [png_bytes(make_image(40 + 8 * i, 32, 500 + i)) for i in range(4)]
    rng = random.Random(7)
    shapes = []
    for i in range(24):
        n = rng.randint(0, 3)
        images = [
            hot[rng.randrange(4)]
            if rng.random() < 0.6
            else png_bytes(make_image(24 + 4 * i, 40, 600 + i * 4 + k))
            for k in range(n)
        ]
        prompt = f"USER: {' '.join([ph] * n)} question {i} ASSISTANT:"
        shapes.append((prompt, images, rng.randint(1, 8)))
    return shapes


@pytest.mark.slow
def test_soak_with_aborts_and_bad_input(tiny_model_dir):
    model = tiny_model_dir("llava")
    adapter = load_adapter(model)
    ph = adapter.spec.image_placeholder
    shapes = _shapes(ph)
    expected = [
        reference_tokens(adapter, [adapter.prepare(p, imgs)], new)[0] for p, imgs, new in shapes
    ]
    config = EPDConfig(
        mode="epd", num_encode=2, mm_cache_tokens=256, kv_cache_tokens=512,
        max_image_pixels=120 * 120, max_inflight_requests=16, request_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    rng = random.Random(11)
    plan = []  # (request, kind, shape index)
    for i in range(REQUESTS):
        roll = rng.random()
        k = rng.randrange(len(shapes))
        prompt, images, new = shapes[k]
        if roll < 0.05:
            plan.append((Request(f"{ph} bad", [b"\x89PNG\r\n\x1a\n broken"], 3), "bad", k))
        elif roll < 0.08:
            big = png_bytes(make_image(160, 160, i))
            plan.append((Request(f"{ph} too big", [big], 3), "oversize", k))
        elif roll < 0.10:
            plan.append((Request("word " * 4000, [], 3), "oversize", k))
        else:
            kind = "abort" if roll < 0.22 else "good"
            plan.append((Request(prompt, list(images), new, id=f"soak-{i}"), kind, k))
    timers = []
    with EPDCluster.launch(model, config) as cluster:
        futures = []
        for request, kind, _ in plan:
            future = cluster.submit(request)
            futures.append(future)
            if kind == "abort":
                timer = threading.Timer(rng.uniform(0.0, 0.3), future.cancel)
                timer.start()
                timers.append(timer)
        for timer in timers:
            timer.join(TIMEOUT_S)
        results = []
        for future in futures:
            if future.cancelled():
                results.append(None)
            else:
                results.append(future.result(timeout=TIMEOUT_S))
    cancelled = 0
    for (request, kind, k), result in zip(plan, results):
        if kind in ("bad", "oversize"):
            assert result is not None and result.error, (kind, request.id)
        elif kind == "good":
            assert result.error is None, (request.id, result.error)
            assert result.token_ids == expected[k], request.id
        elif result is None:
            cancelled += 1
        else:  # finished before its cancel came, or failed with the reason
            assert result.error is None or result.error == "aborted", result.error
            if result.error is None:
                assert result.token_ids == expected[k]
    assert cancelled > 0
    stats = cluster.worker_stats()
    in_use = {f"{w}.{k}": v for w, s in stats.items() for k, v in s.items() if "blocks_in_use" in k}
    assert in_use and set(in_use.values()) == {0.0}, in_use
