# SPDX-License-Identifier: Apache-2.0
"""Synthetic workloads: Poisson arrivals, 1..k images per request, deterministic content."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image

from epdrt.runtime.request import Request

WORDS = ["describe", "the", "image", "what", "is", "in", "this", "picture", "and", "how", "many"]


@dataclass
class TimedRequest:
    """A request and its arrival time in seconds after the workload starts."""

    arrival_s: float
    request: Request


def synthetic_image(rng: random.Random, sizes: list[tuple[int, int]]) -> bytes:
    """A PNG of random blocks at one of ``sizes`` (width, height)."""
    width, height = rng.choice(sizes)
    img = Image.new("RGB", (width, height))
    step = max(4, min(width, height) // 4)
    for x in range(0, width, step):
        for y in range(0, height, step):
            color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            img.paste(color, (x, y, min(x + step, width), min(y + step, height)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def poisson_workload(
    num_requests: int,
    rate_per_s: float,
    placeholder: str,
    *,
    images_per_request: tuple[int, int] = (1, 4),
    image_sizes: list[tuple[int, int]] | None = None,
    max_new_tokens: tuple[int, int] = (4, 16),
    repeat_image_prob: float = 0.2,
    seed: int = 0,
) -> list[TimedRequest]:
    """``num_requests`` requests with exponential inter-arrival gaps (mean ``1/rate``).

    Each request has a uniform number of images in ``images_per_request``; with probability
    ``repeat_image_prob`` an image repeats an earlier one (exercises the MM-token cache).
    """
    rng = random.Random(seed)
    sizes = image_sizes or [(32, 32), (48, 40), (64, 64)]
    seen: list[bytes] = []
    out, t = [], 0.0
    for i in range(num_requests):
        t += rng.expovariate(rate_per_s)
        images = []
        for _ in range(rng.randint(*images_per_request)):
            if seen and rng.random() < repeat_image_prob:
                images.append(rng.choice(seen))
            else:
                images.append(synthetic_image(rng, sizes))
                seen.append(images[-1])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        prompt = " ".join([placeholder] * len(images) + [words])
        req = Request(prompt, images, rng.randint(*max_new_tokens), id=f"r{i:04d}")
        out.append(TimedRequest(t, req))
    return out
