# SPDX-License-Identifier: Apache-2.0
"""Triton KV gather: sequences' pages into contiguous K/V tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import is_interpreted, row_tiles

#: Triton's limit on grid dims 1 and 2 (sequences, layers).
MAX_GRID_YZ = 65535


@triton.jit
def _kv_gather_kernel(
    cache_ptr,
    table_ptr,
    cu_ptr,
    key_ptr,
    value_ptr,
    table_stride,
    cache_stride_b,
    cache_stride_l,
    cache_stride_kv,
    cache_stride_t,
    out_stride_l,
    block_size,
    ROW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (i, s, l): positions [i * BLOCK_T, (i + 1) * BLOCK_T) of sequence s, layer l.
    seq = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    pos = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = pos < length
    index = pos // block_size
    block = tl.load(table_ptr + seq * table_stride + index, mask=tmask, other=0).to(tl.int64)
    src = block * cache_stride_b + (pos - index * block_size) * cache_stride_t
    src += layer * cache_stride_l
    dst = layer * out_stride_l + (start + pos) * ROW
    for r0 in range(0, ROW, BLOCK_R):
        col = r0 + tl.arange(0, BLOCK_R)
        mask = tmask[:, None] & (col < ROW)[None, :]
        k = tl.load(cache_ptr + (src[:, None] + col[None, :]), mask=mask)
        tl.store(key_ptr + (dst[:, None] + col[None, :]), k, mask=mask)
        v = tl.load(cache_ptr + (src[:, None] + cache_stride_kv + col[None, :]), mask=mask)
        tl.store(value_ptr + (dst[:, None] + col[None, :]), v, mask=mask)


INTERPRETED = is_interpreted(_kv_gather_kernel)


def launch(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_len: int,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Checked arguments of ``epdrt.kernels.kv_gather``, in their 6-D forms.

    kv_cache ``[num_blocks, L, 2, bs, H, D]`` (integer view, last two dims packed);
    block_tables ``[S, max_blocks]`` (last dim packed); cu_seq_lens ``[S + 1]`` int64 on the
    device; key/value ``[L, T, H, D]`` contiguous.
    """
    num_seqs, num_layers = block_tables.shape[0], kv_cache.shape[1]
    if max_len == 0 or num_seqs == 0 or num_layers == 0:
        return
    row = kv_cache.shape[4] * kv_cache.shape[5]
    block_t, block_r = row_tiles(row, INTERPRETED)
    grid = (triton.cdiv(max_len, block_t), num_seqs, num_layers)
    _kv_gather_kernel[grid](
        kv_cache, block_tables, cu_seq_lens, key, value,
        block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        key.stride(0), kv_cache.shape[3],
        ROW=row, BLOCK_T=block_t, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
