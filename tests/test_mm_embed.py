# SPDX-License-Identifier: Apache-2.0
"""mm_embed: prefill inputs_embeds from text embeddings and MMTokenCache pages. The Triton
kernel (interpreted on CPU) against the reference, both against rows pasted by hand; the row
map builder; argument errors raised before any launch."""

import pytest
import torch
from kernel_utils import CPU_TRITON, DEVICES, bits_equal, random_bits

from epdrt import InvalidArgument, MMTokenCache
from epdrt.kernels import assemble_inputs_embeds, mm_embed, mm_source_rows
from epdrt.kernels import reference as refs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BLOCK_SIZES = [1, 16, 64]
HIDDEN = 40  # not a power of two
# (backend, device) pairs: the reference, Triton interpreted on CPU, Triton on a GPU.
IMPLS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("triton", "cpu", marks=CPU_TRITON, id="triton-cpu"),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-cuda"),
]
# Flat batches: per request, its text length and its images as (offset in the request, tokens).
BATCHES = {
    "empty": [],
    "text only": [(7, [])],
    "one-token image": [(1, [(0, 1)])],
    "several images": [(30, [(2, 5), (9, 17)]), (3, []), (70, [(0, 64), (64, 3)])],
    "mixed sizes": [(5, [(4, 1)]), (81, [(1, 16), (20, 33), (60, 20)])],
}


def build(batch, block_size, dtype, gen, device="cpu"):
    """Caches every image of ``batch``; returns the cache, text embeddings, placements and the
    expected inputs_embeds (image tokens pasted over their placeholder rows)."""
    images = [n for _, imgs in batch for _, n in imgs]
    blocks = 2 + sum(-(-n // block_size) for n in images)
    cache = MMTokenCache(HIDDEN, block_size, blocks, dtype, device)
    cache.storage.copy_(random_bits(cache.storage.shape, dtype, gen))  # stale page contents
    total = sum(length for length, _ in batch)
    text = random_bits((total, HIDDEN), dtype, gen).to(device)
    expected = text.clone()
    placements, start = [], 0
    for length, imgs in batch:
        for offset, n in imgs:
            tokens = random_bits((n, HIDDEN), dtype, gen).to(device)
            entry = cache.put(len(placements) + 1, tokens, hold=True)
            placements.append((start + offset, entry))
            expected[start + offset : start + offset + n] = tokens
        start += length
    return cache, text, placements, expected


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("batch", list(BATCHES.values()), ids=list(BATCHES))
@pytest.mark.parametrize("backend, device", IMPLS)
def test_matches_pasted_rows(dtype, block_size, batch, backend, device):
    gen = torch.Generator().manual_seed(block_size)
    cache, text, placements, expected = build(batch, block_size, dtype, gen, device)
    rows = mm_source_rows(
        text.shape[0],
        [(s, e.blocks, e.num_tokens) for s, e in placements],
        block_size,
        num_blocks=cache.num_blocks,
        device=device,
    )
    assert bits_equal(refs.mm_embed(text, cache.storage, rows), expected)
    out = mm_embed(text, cache.storage, rows, backend=backend)
    assert bits_equal(out, expected)
    in_place = text.clone()
    assert mm_embed(in_place, cache.storage, rows, out=in_place, backend=backend) is in_place
    assert bits_equal(in_place, expected)
    assert bits_equal(assemble_inputs_embeds(text, cache, placements, backend=backend), expected)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=CPU_TRITON)])
def test_strided_text_and_out(backend):
    gen = torch.Generator().manual_seed(2)
    cache, text, placements, expected = build(BATCHES["several images"], 16, torch.bfloat16, gen)
    wide = random_bits((text.shape[0], 2 * HIDDEN), torch.bfloat16, gen)
    wide[:, :HIDDEN] = text
    out = torch.empty_like(wide)[:, HIDDEN:]
    rows = mm_source_rows(text.shape[0], [(s, e.blocks, e.num_tokens) for s, e in placements], 16)
    mm_embed(wide[:, :HIDDEN], cache.storage, rows.to(torch.int32), out=out, backend=backend)
    assert bits_equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_row_loop_and_tails(monkeypatch, device):
    """Small tiles: several column chunks and row tiles, each with a masked tail."""
    monkeypatch.setattr("epdrt.kernels._triton.mm_embed.row_tiles", lambda row, interp: (4, 16))
    gen = torch.Generator().manual_seed(4)
    cache, text, placements, expected = build(
        BATCHES["mixed sizes"], 16, torch.float16, gen, device
    )
    for out in (None, text.clone()):
        got = assemble_inputs_embeds(text if out is None else out, cache, placements, out=out,
                                     backend="triton")  # fmt: skip
        assert bits_equal(got, expected)


def test_source_rows_layout():
    rows = mm_source_rows(10, [(1, [7, 2], 5), (8, [4], 2)], block_size=3)
    assert rows.tolist() == [-1, 21, 22, 23, 6, 7, -1, -1, 12, 13]
    assert mm_source_rows(0, [], 16).shape == (0,)
    assert mm_source_rows(4, [(2, [], 0)], 16).tolist() == [-1] * 4


@pytest.mark.parametrize(
    "num_tokens, placements, match",
    [
        (10, [(0, [0, 1], 5), (4, [2], 2)], "overlap"),
        (10, [(8, [0], 3)], "covers rows"),
        (10, [(0, [0], 4)], "blocks of"),
        (10, [(0, [9], 2)], "blocks"),
        (10, [(-1, [0], 2)], "start"),
        (10, [(0, [0])], "placement"),
    ],
)
def test_source_rows_errors(num_tokens, placements, match):
    with pytest.raises(InvalidArgument, match=match):
        mm_source_rows(num_tokens, placements, block_size=3, num_blocks=4)


def _bad_cases():
    text, pages = torch.zeros(6, 8), torch.zeros(4, 2, 8)
    rows = torch.tensor([-1, 0, 1, 7, -1, -1])
    return {
        "row too large": dict(text_embeds=text, mm_pages=pages, src_rows=rows + 1),
        "row below -1": dict(text_embeds=text, mm_pages=pages, src_rows=rows - 1),
        "rows length": dict(text_embeds=text, mm_pages=pages, src_rows=rows[:5]),
        "rows dtype": dict(text_embeds=text, mm_pages=pages, src_rows=rows.float()),
        "rows strided": dict(text_embeds=text, mm_pages=pages, src_rows=rows.repeat(2)[::2]),
        "page dtype": dict(text_embeds=text, mm_pages=pages.half(), src_rows=rows),
        "hidden": dict(text_embeds=text, mm_pages=torch.zeros(4, 2, 9), src_rows=rows),
        "pages strided": dict(text_embeds=text, mm_pages=torch.zeros(4, 8, 2).mT, src_rows=rows),
        "text strided": dict(text_embeds=torch.zeros(8, 6).T, mm_pages=pages, src_rows=rows),
        "out shape": dict(text_embeds=text, mm_pages=pages, src_rows=rows, out=torch.zeros(6, 9)),
        "out dtype": dict(
            text_embeds=text, mm_pages=pages, src_rows=rows, out=torch.zeros(6, 8).half()
        ),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_arguments_raise(case, backend):
    with pytest.raises(InvalidArgument):
        mm_embed(backend=backend, **_bad_cases()[case])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_gpu_triton_matches_reference(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    hidden, num_tokens = 3584, 3000
    pages = random_bits((4096 // block_size + 1, block_size, hidden), dtype, gen).cuda()
    text = random_bits((num_tokens, hidden), dtype, gen).cuda()
    placements, start = [], 5
    for n in (1, 576, 17, 1200):
        blocks = torch.randperm(pages.shape[0], generator=gen)[: -(-n // block_size)].tolist()
        placements.append((start, blocks, n))
        start += n + 7
    rows = mm_source_rows(num_tokens, placements, block_size, device="cuda")
    expected = refs.mm_embed(text, pages, rows)
    assert bits_equal(mm_embed(text, pages, rows), expected)
    mm_embed(text, pages, rows, out=text)
    torch.cuda.synchronize()
    assert bits_equal(text, expected)
