# SPDX-License-Identifier: Apache-2.0
"""Triton block copy: the fallback where the CUDA kernel is not compiled, and the CPU check."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import is_interpreted

#: Triton's limit on grid dim 1 (chunks of one block).
MAX_GRID_Y = 65535


@triton.jit
def _block_copy_kernel(
    src_ptr,
    dst_ptr,
    pairs_ptr,
    block_words,
    src_stride,
    dst_stride,
    src_offset,
    dst_offset,
    BLOCK: tl.constexpr,
):
    # Program (p, c): words [c * BLOCK, (c + 1) * BLOCK) of pair p.
    p = tl.program_id(0).to(tl.int64)
    s = tl.load(pairs_ptr + 2 * p).to(tl.int64)
    d = tl.load(pairs_ptr + 2 * p + 1).to(tl.int64)
    w = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = w < block_words
    x = tl.load(src_ptr + (src_offset + s * src_stride + w), mask=mask)
    tl.store(dst_ptr + (dst_offset + d * dst_stride + w), x, mask=mask)


INTERPRETED = is_interpreted(_block_copy_kernel)


def launch(
    src: torch.Tensor,
    dst: torch.Tensor,
    pairs: torch.Tensor,
    block_words: int,
    src_stride: int,
    dst_stride: int,
    src_offset: int,
    dst_offset: int,
) -> None:
    """Checked arguments of ``epdrt.kernels.block_copy`` in words of ``src.dtype``.

    src/dst: 1-D word views of the two buffers; pairs ``[n, 2]`` contiguous on their device.
    """
    n = pairs.shape[0]
    if n == 0 or block_words == 0:
        return
    width = triton.next_power_of_2(block_words)
    block = min(width, 1 << 16) if INTERPRETED else min(width, 4096)
    chunks = triton.cdiv(block_words, block)
    if chunks > MAX_GRID_Y:
        block = triton.next_power_of_2(triton.cdiv(block_words, MAX_GRID_Y))
        chunks = triton.cdiv(block_words, block)
    _block_copy_kernel[(n, chunks)](
        src, dst, pairs, block_words, src_stride, dst_stride, src_offset, dst_offset,
        BLOCK=block, num_warps=4,
    )  # fmt: skip
