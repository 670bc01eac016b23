# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by tests/test_models_*.py: test images, the staged pipeline, HF references."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from epdrt.cache import sizing
from epdrt.models import FlatBatch, ModelAdapter, PreparedRequest, insert_image_tokens

#: A chat template for the tiny LLaVA (which has none): "role: text <image> ...", then
#: "assistant:". The server tests render with it and compare with the prompt it gives.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}{% if p.type == 'image' %}<image> {% else %}{{ p.text }} "
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:"
    "{% endif %}"
)


def make_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic noisy gradient image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256])
    noise = rng.integers(0, 96, size=(3, height, width))
    rgb = ((base + noise) % 256).astype(np.uint8).transpose(1, 2, 0)
    img = Image.fromarray(rgb, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Case:
    """One request of an equivalence test."""

    prompt: str
    images: list[Image.Image]


def staged_generate(
    encoder: ModelAdapter,
    lm: ModelAdapter,
    requests: Sequence[PreparedRequest],
    max_new_tokens: int,
    *,
    batched_prefill: bool = False,
    chunk: int | None = None,
    block_size: int = 16,
) -> list[list[int]]:
    """Greedy tokens through the split pipeline over a paged KV cache.

    Images of all requests are encoded in one batch; prefill runs per request (or all in one
    flat batch), in chunks of at most ``chunk`` tokens per request per step when given; decode
    runs all unfinished requests in one flat batch.
    """
    eos = set(lm.spec.eos_token_ids)
    images = [im for r in requests for im in r.images]
    feats = iter(encoder.encode(images))
    embeds = []
    for r in requests:
        e = lm.embed(r.input_ids)
        insert_image_tokens(e, r.image_starts, [next(feats) for _ in r.images])
        embeds.append(e)
    total = sum(r.num_tokens + max_new_tokens for r in requests)
    kv = sizing.kv_cache(lm.spec, total + block_size * len(requests), block_size, lm.dtype,
                         lm.device)  # fmt: skip
    groups = (
        [list(range(len(requests)))] if batched_prefill else [[i] for i in range(len(requests))]
    )
    first: dict[int, int] = {}
    for group in groups:
        done = dict.fromkeys(group, 0)
        while any(done[i] < requests[i].num_tokens for i in group):
            todo = [i for i in group if done[i] < requests[i].num_tokens]
            step = {i: min(requests[i].num_tokens - done[i], chunk or 1 << 30) for i in todo}
            for i in todo:
                kv.reserve(i, step[i])
            batch = FlatBatch.build(kv, [(i, step[i]) for i in todo])
            rows = torch.cat([embeds[i][done[i] : done[i] + step[i]] for i in todo])
            logits = lm.forward(rows, batch, [requests[i].extras for i in todo])
            for j, i in enumerate(todo):
                done[i] += step[i]
                if done[i] == requests[i].num_tokens:
                    first[i] = int(logits[j].argmax())
    tokens = [[first[i]] for i in range(len(requests))]
    extras = [lm.decode_extras(r.extras) for r in requests]
    live = [i for i, t in enumerate(tokens) if t[-1] not in eos and max_new_tokens > 1]
    while live:
        for i in live:
            kv.reserve(i, 1)
        batch = FlatBatch.build(kv, [(i, 1) for i in live])
        logits = lm.forward(
            lm.embed([tokens[i][-1] for i in live]), batch, [extras[i] for i in live]
        )
        assert logits.shape == (len(live), lm.spec.vocab_size)
        for j, i in enumerate(live):
            tokens[i].append(int(logits[j].argmax()))
        live = [i for i in live if tokens[i][-1] not in eos and len(tokens[i]) < max_new_tokens]
    return tokens


def hf_generate(model, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[int]:
    """New tokens of ``model.generate(do_sample=False)`` for one unpadded request."""
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return [int(t) for t in out[0, n:]]


def hf_inputs(adapter: ModelAdapter, request: PreparedRequest) -> dict[str, torch.Tensor]:
    """What the model's own HF processor would hand ``model.generate`` for ``request``."""
    ids = torch.tensor([request.input_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if request.images:
        for name in request.images[0].tensors:
            inputs[name] = torch.cat([im.tensors[name] for im in request.images])
        if "image_grid_thw" in inputs:  # Qwen2-VL's M-RoPE index needs the token types
            inputs["mm_token_type_ids"] = (ids == adapter.spec.image_token_id).long()
    return {name: t.to(adapter.device) for name, t in inputs.items()}


def reference_tokens(
    adapter: ModelAdapter, requests: Sequence[PreparedRequest], max_new_tokens: int
) -> list[list[int]]:
    """``model.generate(do_sample=False)`` of the unsplit model, one request at a time."""
    return [hf_generate(adapter.model, hf_inputs(adapter, r), max_new_tokens) for r in requests]
