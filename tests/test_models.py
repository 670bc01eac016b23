# SPDX-License-Identifier: Apache-2.0
"""Model adapters: the split stages give exactly the tokens of ``model.generate``; request
preprocessing (placeholder expansion, content keys) and its errors."""

from __future__ import annotations

import pytest
import torch
from model_utils import make_image, png_bytes, reference_tokens, staged_generate

from epdrt.models import ImageLimits, RequestError, load_adapter

ARCHS = ["llava", "qwen2-vl"]
MAX_NEW = 8


@pytest.fixture(scope="module", params=ARCHS)
def adapter(request, tiny_model_dir):
    return load_adapter(tiny_model_dir(request.param))


def _cases(ph: str) -> list[tuple[str, list]]:
    return [
        (f"USER: {ph}\nWhat is in the picture? ASSISTANT:", [make_image(40, 30, 1)]),
        (f"{ph} and {ph} then {ph}: compare", [make_image(64, 48, s) for s in (2, 3, 4)]),
        ("A question without any image", []),
        (f"{ph} odd sized", [make_image(97, 13, 5)]),
    ]


@pytest.mark.parametrize(
    ("batched_prefill", "chunk", "block_size"),
    [(False, None, 16), (True, None, 16), (True, 7, 16), (False, 5, 4)],
    ids=["one-by-one", "flat-batch", "chunks-of-7", "chunks-of-5-bs4"],
)
def test_staged_tokens_equal_generate(adapter, batched_prefill, chunk, block_size):
    """Paged execution (flat batches, chunked prefill, decode over pages) gives the tokens of
    ``generate()``."""
    reqs = [adapter.prepare(p, ims) for p, ims in _cases(adapter.spec.image_placeholder)]
    got = staged_generate(
        adapter, adapter, reqs, MAX_NEW, batched_prefill=batched_prefill, chunk=chunk,
        block_size=block_size,
    )  # fmt: skip
    assert got == reference_tokens(adapter, reqs, MAX_NEW)
    assert sum(len(t) for t in got) > 2 * len(got)  # real decoding happened, not just EOS


def test_stage_subsets_load_only_their_weights(tiny_model_dir):
    d = tiny_model_dir("llava")
    enc = load_adapter(d, stages={"encode"})
    lm = load_adapter(d, stages={"prefill", "decode"})
    vision = sum(p.numel() for p in enc.model.model.vision_tower.parameters())
    assert all(p.device.type != "meta" for p in enc.model.model.vision_tower.parameters())
    assert all(p.device.type == "meta" for p in enc.model.model.language_model.parameters())
    assert all(p.device.type == "meta" for p in lm.model.model.vision_tower.parameters())
    assert vision > 0
    full = load_adapter(d)
    reqs = [full.prepare(p, ims) for p, ims in _cases(full.spec.image_placeholder)]
    assert staged_generate(enc, lm, reqs, 4) == staged_generate(full, full, reqs, 4)


def test_placeholder_expands_to_image_tokens(adapter):
    ph = adapter.spec.image_placeholder
    images = [make_image(64, 48, 1), make_image(30, 90, 2)]
    req = adapter.prepare(f"a {ph} b {ph} c", images)
    ids = torch.tensor(req.input_ids)
    assert int((ids == adapter.spec.image_token_id).sum()) == sum(
        im.num_tokens for im in req.images
    )
    for start, im in zip(req.image_starts, req.images):
        span = ids[start : start + im.num_tokens]
        assert bool((span == adapter.spec.image_token_id).all())
    text_only = adapter.prepare("a  b  c", [])
    assert adapter.spec.image_token_id not in text_only.input_ids


def test_llava_expansion_matches_hf_processor(tiny_model_dir):
    from transformers import LlavaProcessor

    a = load_adapter(tiny_model_dir("llava"), stages=set())
    proc = LlavaProcessor(
        image_processor=a.image_processor,
        tokenizer=a.tokenizer,
        patch_size=a.config.vision_config.patch_size,
        vision_feature_select_strategy=a.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    prompt = f"USER: {a.spec.image_placeholder} two {a.spec.image_placeholder} ASSISTANT:"
    images = [make_image(40, 30, 1), make_image(50, 70, 2)]
    hf = proc(text=[prompt], images=images, return_tensors="pt")
    ours = a.prepare(prompt, images)
    assert ours.input_ids == hf["input_ids"][0].tolist()
    assert torch.equal(torch.cat([im.tensors["pixel_values"] for im in ours.images]),
                       hf["pixel_values"])  # fmt: skip


def test_content_keys(tiny_model_dir, tmp_path):
    llava = load_adapter(tiny_model_dir("llava"), stages=set())
    qwen = load_adapter(tiny_model_dir("qwen2-vl"), stages=set())
    img = make_image(33, 21, 7)
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes(img))
    keys = {llava.preprocess_image(src).content_key for src in (img, png_bytes(img), str(path))}
    assert len(keys) == 1  # same pixels, same key, whatever the input form
    key = keys.pop()
    assert isinstance(key, bytes) and len(key) >= 16  # full-width digest
    assert qwen.preprocess_image(img).content_key != key  # another model: another key
    assert llava.preprocess_image(make_image(33, 21, 8)).content_key != key


def test_request_errors(tiny_model_dir, tmp_path):
    a = load_adapter(
        tiny_model_dir("llava"),
        stages=set(),
        limits=ImageLimits(max_images=2, max_bytes=600_000, max_pixels=300 * 300),
    )
    ph = a.spec.image_placeholder
    good = png_bytes(make_image(40, 30, 1))
    tiff = png_bytes(make_image(40, 30, 1), fmt="TIFF")
    cases = {
        "not a readable image": (f"{ph}", [b"\x89PNG definitely not an image"]),
        "corrupt": (f"{ph}", [good[: len(good) // 2]]),
        "not accepted": (f"{ph}", [tiff]),
        "pixels, more than the limit": (f"{ph}", [png_bytes(make_image(400, 400, 2))]),
        "bytes, more than the limit": (f"{ph}", [bytes(700_000)]),
        "more than the limit of 2": (f"{ph}{ph}{ph}", [good, good, good]),
        "placeholders": (f"{ph}{ph}", [good]),
        "context": (f"{ph} " + "word " * 2000, [good]),
        "could not read": (f"{ph}", [str(tmp_path / "missing.png")]),
        "an image must be": (f"{ph}", [12345]),
    }
    for expected, (prompt, images) in cases.items():
        with pytest.raises(RequestError, match=expected):
            a.prepare(prompt, images, max_new_tokens=4)
    assert a.prepare(ph, [good]).num_tokens > 0  # the adapter is still usable
