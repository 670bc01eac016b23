# SPDX-License-Identifier: Apache-2.0
"""Paged attention in torch ops: what ``backend="torch"`` runs (the CPU default).

Reads one layer's pages, never the whole cache, and attends with
``scaled_dot_product_attention`` in the query's dtype (as ``transformers``' SDPA attention does,
so greedy tokens match ``generate()``). Arguments are checked by ``epdrt.kernels.paged_attention``.

Decode gathers the batch's pages of the layer into one ``[b, Hkv, W * bs, D]`` K and V (``W``
the longest table in use; the only buffer that grows with the batch's context, one layer's
worth, freed before the next layer) and runs one masked SDPA call; prefill runs one causal SDPA
call per sequence over that sequence's pages.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa


def decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """``[b, Hq, D]`` attention of one query per sequence over ``context_lens`` tokens each."""
    batch, _, head_dim = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_layer.shape
    width = -(-max_context_len // block_size)
    tokens = width * block_size
    # Table entries past a sequence's blocks may hold anything: any in-range block will do,
    # the mask below hides what it holds.
    tables = block_tables[:, :width].long().clamp(0, num_blocks - 1)
    key = kv_layer[:, 0][tables].view(batch, tokens, num_kv_heads, head_dim).transpose(1, 2)
    value = kv_layer[:, 1][tables].view(batch, tokens, num_kv_heads, head_dim).transpose(1, 2)
    visible = torch.arange(tokens, device=query.device)[None, :] < context_lens[:, None]
    # Stale slots past a sequence's end may hold NaN, which a mask does not hide (NaN scores,
    # 0 * NaN weights): they are zeroed, in place (the gathered K and V are copies).
    hidden = ~visible[:, None, :, None]
    key.masked_fill_(hidden, 0)
    value.masked_fill_(hidden, 0)
    out = sdpa(
        query[:, :, None], key, value, attn_mask=visible[:, None, None, :], scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return out[:, :, 0].contiguous()


def prefill(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``[total_q, Hq, D]``: each sequence's queries (its last positions) attend causally to
    its ``context_lens`` tokens."""
    block_size = kv_layer.shape[2]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for s, n in enumerate(lens):
        first, last = cu[s], cu[s + 1]
        m = last - first
        if m == 0:
            continue
        blocks = block_tables[s, : -(-n // block_size)].long()
        # 4-D [1, H, n, D]: with 3-D inputs, CPU SDPA takes its math path (the whole score
        # matrix in memory), several times slower at 2k tokens.
        key = kv_layer[:, 0][blocks].flatten(0, 1)[:n].transpose(0, 1)[None]  # [1, Hkv, n, D]
        value = kv_layer[:, 1][blocks].flatten(0, 1)[:n].transpose(0, 1)[None]
        q = query[first:last].transpose(0, 1)[None]  # [1, Hq, m, D]
        if m == n:  # a whole prompt: plain causal attention
            att = sdpa(q, key, value, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a later chunk: query i sits at position n - m + i
            rows = torch.arange(m, device=query.device)[:, None] + (n - m)
            mask = torch.arange(n, device=query.device)[None, :] <= rows
            att = sdpa(q, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
        out[first:last] = att[0].transpose(0, 1)
    return out
