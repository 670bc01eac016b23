# SPDX-License-Identifier: Apache-2.0
"""Triton multimodal embedding assembly: text rows plus page rows at placeholder positions."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import is_interpreted, row_tiles


@triton.jit
def _mm_embed_kernel(
    text_ptr,
    pages_ptr,
    src_ptr,
    out_ptr,
    num_tokens,
    text_stride,
    pages_stride_b,
    pages_stride_r,
    out_stride,
    block_size,
    HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    # Program i: output rows [i * BLOCK_T, (i + 1) * BLOCK_T). Row t takes page row src[t] when
    # src[t] >= 0, else text row t (untouched when IN_PLACE: out is text).
    row = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = row < num_tokens
    src = tl.load(src_ptr + row, mask=rmask, other=-1).to(tl.int64)
    mm = rmask & (src >= 0)
    text = rmask & (src < 0)
    src = tl.where(mm, src, 0)
    block = src // block_size
    page_off = block * pages_stride_b + (src - block * block_size) * pages_stride_r
    for r0 in range(0, HIDDEN, BLOCK_R):
        col = r0 + tl.arange(0, BLOCK_R)
        cmask = (col < HIDDEN)[None, :]
        x = tl.load(pages_ptr + (page_off[:, None] + col[None, :]), mask=mm[:, None] & cmask)
        out_off = row[:, None] * out_stride + col[None, :]
        if IN_PLACE:
            tl.store(out_ptr + out_off, x, mask=mm[:, None] & cmask)
        else:
            y = tl.load(
                text_ptr + (row[:, None] * text_stride + col[None, :]), mask=text[:, None] & cmask
            )
            tl.store(out_ptr + out_off, tl.where(mm[:, None], x, y), mask=rmask[:, None] & cmask)


INTERPRETED = is_interpreted(_mm_embed_kernel)


def launch(
    text_embeds: torch.Tensor, mm_pages: torch.Tensor, src_rows: torch.Tensor, out: torch.Tensor
) -> None:
    """Checked arguments of ``epdrt.kernels.mm_embed`` (integer views).

    text_embeds/out ``[T, hidden]`` with unit column stride (``out`` may be ``text_embeds``);
    mm_pages ``[num_blocks, bs, hidden]`` with its last two dims packed; src_rows ``[T]``.
    """
    n, hidden = text_embeds.shape
    if n == 0:
        return
    block_t, block_r = row_tiles(hidden, INTERPRETED)
    in_place = out.data_ptr() == text_embeds.data_ptr()
    _mm_embed_kernel[(triton.cdiv(n, block_t),)](
        text_embeds, mm_pages, src_rows, out, n,
        text_embeds.stride(0), mm_pages.stride(0), mm_pages.stride(1), out.stride(0),
        mm_pages.shape[1],
        HIDDEN=hidden, BLOCK_T=block_t, BLOCK_R=block_r, IN_PLACE=in_place, num_warps=4,
    )  # fmt: skip
