# SPDX-License-Identifier: Apache-2.0
"""Triton paged attention: decode (one query per sequence) and chunked causal prefill.

Both read K/V straight from the pages: a KV position ``p`` of sequence ``s`` lives in block
``table[s, p // bs]`` at offset ``p % bs``, looked up per position, so any block size works and
a tile of positions may cross block boundaries. Scores, softmax statistics and the output
accumulator are fp32 (online softmax); fp16/bf16 probabilities are rounded to the input dtype
for the ``P @ V`` product, as in flash attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import is_interpreted

#: Triton's limit on grid dims 1 and 2.
MAX_GRID_YZ = 65535
_LOG2E = 1.4426950408889634
#: Start of the running maximum: finite, so rows without any visible key give 0, not NaN.
_NEG_BIG = tl.constexpr(-1.0e30)
#: Fewest positions per part, and most parts, of a split decode (see num_splits).
_MIN_SPLIT = 256
_MAX_SPLITS = 64


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    cache_ptr,
    table_row_ptr,
    kv_head_off,
    start,
    ctx,
    q_pos,
    d,
    dmask,
    qk_scale,
    block_size,
    c_stride_b,
    c_stride_kv,
    c_stride_t,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Folds KV positions [start, start + BLOCK_N) into (m_i, l_i, acc); scores in log2 units.
    pos = start + tl.arange(0, BLOCK_N)
    nmask = pos < ctx
    index = pos // block_size
    block = tl.load(table_row_ptr + index, mask=nmask, other=0).to(tl.int64)
    base = block * c_stride_b + (pos - index * block_size).to(tl.int64) * c_stride_t
    base += kv_head_off
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(cache_ptr + (base[:, None] + d[None, :]), mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = nmask[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(cache_ptr + (base[:, None] + c_stride_kv + d[None, :]), mask=kv_mask, other=0.0)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    qk_scale,
    q_stride_b,
    q_stride_h,
    o_stride_b,
    o_stride_h,
    table_stride,
    c_stride_b,
    c_stride_kv,
    c_stride_t,
    c_stride_h,
    block_size,
    split_tokens,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program (s, h, p): the GROUP query heads of KV head h of sequence s over positions
    # [p * split_tokens, (p + 1) * split_tokens). Without SPLIT (one part) it writes the output;
    # with SPLIT, the part's unnormalized (max, sum, acc) for _decode_reduce_kernel.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    part = tl.program_id(2)
    lo = part * split_tokens
    ctx = tl.minimum(tl.load(lens_ptr + seq), lo + split_tokens)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    qmask = gmask[:, None] & dmask[None, :]
    q_off = seq * q_stride_b + heads[:, None] * q_stride_h + d[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = table_ptr + seq * table_stride
    for start in range(lo, ctx, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, cache_ptr, table_row, kv_head * c_stride_h, start, ctx, g, d, dmask,
            qk_scale, block_size, c_stride_b, c_stride_kv, c_stride_t,
            BLOCK_N=BLOCK_N, CAUSAL=False, PRECISION=PRECISION, UPCAST=UPCAST,
        )  # fmt: skip
    if SPLIT:
        # Parts [b, Hq, num_parts] (acc: [..., BLOCK_D]); an empty part leaves (NEG_BIG, 0, 0).
        row = (seq * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + part
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
        tl.store(part_acc_ptr + (row[:, None] * BLOCK_D + d[None, :]), acc, mask=qmask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = seq * o_stride_b + heads[:, None] * o_stride_h + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    o_stride_b,
    o_stride_h,
    num_parts,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (s, h): combines query head h of sequence s over its num_parts parts.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    pmask = p < num_parts
    row = (seq * tl.num_programs(1) + head) * num_parts + p
    m = tl.load(part_m_ptr + row, mask=pmask, other=_NEG_BIG)
    l_p = tl.load(part_l_ptr + row, mask=pmask, other=0.0)
    acc = tl.load(
        part_acc_ptr + (row[:, None] * BLOCK_D + d[None, :]), mask=pmask[:, None], other=0.0
    )
    weight = tl.math.exp2(m - tl.max(m, 0))
    total = tl.sum(l_p * weight, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_off = seq * o_stride_b + head * o_stride_h + d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    table_ptr,
    cu_ptr,
    lens_ptr,
    out_ptr,
    qk_scale,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    table_stride,
    c_stride_b,
    c_stride_kv,
    c_stride_t,
    c_stride_h,
    block_size,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program (i, s, h): queries [i * BLOCK_Q, (i + 1) * BLOCK_Q) of sequence s with the GROUP
    # query heads of KV head h, so each K/V tile loaded serves the whole group. Row r holds
    # query i * BLOCK_Q + r // GROUP, head h * GROUP + r % GROUP (rows past BLOCK_Q * GROUP
    # are idle).
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)
    if tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(lens_ptr + seq)
    r = tl.arange(0, BLOCK_M)
    rows = tile * BLOCK_Q + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    q_pos = ctx - q_len + rows  # absolute position of each query in its sequence
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    qmask = ((r < BLOCK_Q * GROUP) & (rows < q_len))[:, None] & dmask[None, :]
    q_off = (q_start + rows)[:, None] * q_stride_t + heads[:, None] * q_stride_h + d[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = table_ptr + seq * table_stride
    end = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_Q)  # causal: no key past the last row
    for start in range(0, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, cache_ptr, table_row, kv_head * c_stride_h, start, end, q_pos, d,
            dmask, qk_scale, block_size, c_stride_b, c_stride_kv, c_stride_t,
            BLOCK_N=BLOCK_N, CAUSAL=True, PRECISION=PRECISION, UPCAST=UPCAST,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_start + rows)[:, None] * o_stride_t + heads[:, None] * o_stride_h + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask)


INTERPRETED = is_interpreted(_decode_kernel)


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """``PRECISION`` and ``UPCAST`` of the kernels for inputs of ``dtype``.

    NOTE: fp32 products are full precision (TF32 would lose the fp32 accuracy asked for); fp16
    and bf16 take the target's default. The interpreter's ``tl.dot`` returns garbage for bf16
    operands (triton 3.9), so there bf16 tiles are widened to fp32 after loading (probabilities
    still rounded to bf16 first); on a GPU they go to the tensor cores as bf16.
    """
    upcast = INTERPRETED and dtype == torch.bfloat16
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else None, "UPCAST": upcast}


def num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Parts to split each sequence's positions into, so that a decode batch fills the GPU.

    NOTE: one program per (sequence, KV head) leaves most of a GPU idle for small batches of
    long sequences (8 KV heads, batch 1: 8 programs). Parts of at least ``_MIN_SPLIT`` positions
    are added until there are about two programs per SM; the combine costs one small launch.
    The interpreter runs one part (tests force more by replacing this function).
    """
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    base = batch * num_kv_heads
    if base >= programs:
        return 1
    return max(1, min(-(-programs // base), -(-max_len // _MIN_SPLIT), _MAX_SPLITS))


def launch_decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_len: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Checked arguments of ``epdrt.kernels.paged_attention_decode``.

    query ``[b, Hq, D]`` and out (same shape) with unit stride in D; kv_layer
    ``[num_blocks, 2, bs, Hkv, D]`` with unit stride in D; block_tables ``[b, max_blocks]``
    int32 with unit stride in its last dim; context_lens ``[b]`` int32, all ``>= 1``, the
    largest ``max_len``.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = kv_layer.shape[3]
    if batch == 0:
        return
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if INTERPRETED or query.dtype != torch.float32 else 32
    parts = num_splits(batch, num_kv_heads, max_len, query.device)
    split_tokens = triton.cdiv(triton.cdiv(max_len, parts), block_n) * block_n
    parts = triton.cdiv(max_len, split_tokens)
    if parts > 1:
        part_m = torch.empty((batch, num_heads, parts), dtype=torch.float32, device=out.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((*part_m.shape, block_d), dtype=torch.float32, device=out.device)
    else:
        part_m = part_l = part_acc = out  # not written
    _decode_kernel[(batch, num_kv_heads, parts)](
        query, kv_layer, block_tables, context_lens, out, scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        kv_layer.shape[2], split_tokens, part_m, part_l, part_acc,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, SPLIT=parts > 1, num_warps=4,
        **_dot_options(query.dtype),
    )  # fmt: skip
    if parts > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_m, part_l, part_acc, out, out.stride(0), out.stride(1), parts,
            HEAD_DIM=head_dim, BLOCK_P=triton.next_power_of_2(parts), BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip


def launch_prefill(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Checked arguments of ``epdrt.kernels.paged_attention_prefill``.

    As :func:`launch_decode`, with query/out ``[total_q, Hq, D]``, cu_seqlens_q ``[b + 1]``
    int32 and ``max_q_len`` the longest sequence's query count.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_layer.shape[3]
    batch = block_tables.shape[0]
    if batch == 0 or max_q_len == 0:
        return
    group = num_heads // num_kv_heads
    rows = 64 if INTERPRETED or query.dtype != torch.float32 else 32
    block_m = max(rows, triton.next_power_of_2(group))
    block_q = block_m // group
    block_n = 64 if INTERPRETED or query.dtype != torch.float32 else 32
    grid = (triton.cdiv(max_q_len, block_q), batch, num_kv_heads)
    _prefill_kernel[grid](
        query, kv_layer, block_tables, cu_seqlens_q, context_lens, out, scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        kv_layer.shape[2],
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=block_q,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, num_warps=4,
        **_dot_options(query.dtype),
    )  # fmt: skip
