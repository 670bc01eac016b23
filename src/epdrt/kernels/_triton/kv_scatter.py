# SPDX-License-Identifier: Apache-2.0
"""Triton KV scatter: new tokens' K/V rows into paged cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import is_interpreted, row_tiles


@triton.jit
def _kv_scatter_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    num_tokens,
    key_stride_l,
    key_stride_t,
    value_stride_l,
    value_stride_t,
    cache_stride_b,
    cache_stride_l,
    cache_stride_kv,
    cache_stride_t,
    block_size,
    ROW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (i, l): tokens [i * BLOCK_T, (i + 1) * BLOCK_T) of layer l, whole rows of ROW.
    layer = tl.program_id(1).to(tl.int64)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < num_tokens
    slot = tl.load(slot_ptr + tok, mask=tmask, other=0).to(tl.int64)
    block = slot // block_size
    dst = block * cache_stride_b + (slot - block * block_size) * cache_stride_t
    dst += layer * cache_stride_l
    k_src = tok * key_stride_t + layer * key_stride_l
    v_src = tok * value_stride_t + layer * value_stride_l
    for r0 in range(0, ROW, BLOCK_R):
        col = r0 + tl.arange(0, BLOCK_R)
        mask = tmask[:, None] & (col < ROW)[None, :]
        k = tl.load(key_ptr + (k_src[:, None] + col[None, :]), mask=mask)
        tl.store(cache_ptr + (dst[:, None] + col[None, :]), k, mask=mask)
        v = tl.load(value_ptr + (v_src[:, None] + col[None, :]), mask=mask)
        tl.store(cache_ptr + (dst[:, None] + cache_stride_kv + col[None, :]), v, mask=mask)


INTERPRETED = is_interpreted(_kv_scatter_kernel)


def launch(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Checked arguments of ``epdrt.kernels.kv_scatter``, already in their 6-D forms.

    key/value ``[L, n, H, D]``, kv_cache ``[num_blocks, L, 2, bs, H, D]`` (integer views), each
    with its last two dims packed; slot_mapping ``[n]`` contiguous.
    """
    num_layers, n = key.shape[0], key.shape[1]
    if n == 0 or num_layers == 0:
        return
    row = key.shape[2] * key.shape[3]
    block_t, block_r = row_tiles(row, INTERPRETED)
    grid = (triton.cdiv(n, block_t), num_layers)
    _kv_scatter_kernel[grid](
        key, value, kv_cache, slot_mapping, n,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[3],
        ROW=row, BLOCK_T=block_t, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
