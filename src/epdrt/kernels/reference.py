# SPDX-License-Identifier: Apache-2.0
"""Pure-torch references of the kernels in ``epdrt.kernels``: the executable spec, and the
path the kernels take on a CPU.

Same names and arguments as the kernels, minus the checks and backend options. Tests compare
the kernels with these bit for bit; benchmarks time them as the CPU path. Shapes: ``H`` KV heads,
``D`` head dim, ``L`` layers, ``bs`` tokens per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def kv_scatter(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes token ``i``'s K/V at cache slot ``slot_mapping[i]`` (``block * bs + offset``).

    Args:
        key: ``[n, H, D]`` with ``kv_cache`` ``[num_blocks, 2, bs, H, D]`` (one layer), or
            ``[L, n, H, D]`` with ``kv_cache`` ``[num_blocks, L, 2, bs, H, D]`` (all layers).
        value: same shape as ``key``.
        kv_cache: written in place (may be a strided view, e.g. ``PagedKVCache.layer(l)``).
        slot_mapping: ``[n]`` integer, unique slots.
    """
    bs = kv_cache.shape[-3]
    slots = slot_mapping.long()
    blocks, offsets = slots // bs, slots % bs
    if kv_cache.dim() == 5:
        kv_cache[blocks, 0, offsets] = key
        kv_cache[blocks, 1, offsets] = value
    else:  # indices around a slice: the token dim comes first, [n, L, H, D]
        kv_cache[blocks, :, 0, offsets] = key.transpose(0, 1)
        kv_cache[blocks, :, 1, offsets] = value.transpose(0, 1)


def kv_gather(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads sequences' K/V out of the pages into new contiguous tensors.

    Args:
        kv_cache: ``[num_blocks, 2, bs, H, D]`` or ``[num_blocks, L, 2, bs, H, D]``.
        block_tables: ``[num_seqs, max_blocks]`` integer; entries past a sequence's
            ``ceil(len / bs)`` blocks are ignored.
        seq_lens: ``num_seqs`` token counts.

    Returns:
        ``(key, value)``, each ``[T, H, D]`` (or ``[L, T, H, D]``), ``T = sum(seq_lens)``,
        sequences concatenated in order.
    """
    bs = kv_cache.shape[-3]
    lens = [int(n) for n in seq_lens]
    counts = [-(-n // bs) for n in lens]
    tables = block_tables.long()
    used = [tables[s, :k] for s, k in enumerate(counts)]
    blocks = torch.cat(used) if used else tables.new_empty(0)
    # Whole pages first (block-sized copies), then the tokens each sequence holds.
    pages = kv_cache.index_select(0, blocks)  # [B, (L,) 2, bs, H, D]
    pages = pages.movedim(0, -4) if kv_cache.dim() == 6 else pages.movedim(0, 1)
    tokens = pages.reshape(*pages.shape[:-4], -1, *pages.shape[-2:])  # [(L,) 2, B * bs, H, D]
    first = torch.tensor([0, *counts], device=blocks.device).cumsum(0)[:-1] * bs
    pieces = [first[s] + torch.arange(n, device=blocks.device) for s, n in enumerate(lens)]
    keep = torch.cat(pieces) if pieces else first.new_empty(0)
    if kv_cache.dim() == 5:
        return tokens[0].index_select(0, keep), tokens[1].index_select(0, keep)
    return tokens[:, 0].index_select(1, keep), tokens[:, 1].index_select(1, keep)


def mm_embed(
    text_embeds: torch.Tensor, mm_pages: torch.Tensor, src_rows: torch.Tensor
) -> torch.Tensor:
    """Prefill ``inputs_embeds``: text rows, with multimodal rows taken from cache pages.

    Args:
        text_embeds: ``[T, hidden]`` text-token embeddings of the flat batch.
        mm_pages: ``[num_blocks, bs, hidden]`` (``MMTokenCache.storage``).
        src_rows: ``[T]`` integer; ``-1`` keeps the text row, else ``block * bs + row`` of the
            page row that replaces it.

    Returns:
        A new ``[T, hidden]`` tensor.
    """
    out = text_embeds.clone()
    dst = torch.nonzero(src_rows >= 0).flatten()
    rows = mm_pages.reshape(-1, mm_pages.shape[-1]).index_select(0, src_rows[dst].long())
    return out.index_copy_(0, dst, rows)


def block_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    pairs: torch.Tensor,
    block_bytes: int,
    *,
    src_stride: int | None = None,
    dst_stride: int | None = None,
    src_offset: int = 0,
    dst_offset: int = 0,
) -> None:
    """Copies block ``pairs[i, 0]`` of ``src`` to block ``pairs[i, 1]`` of ``dst``.

    Block ``b`` of a buffer is bytes ``[offset + b * stride, offset + b * stride + block_bytes)``.

    Args:
        src: 1-D ``uint8`` bytes (e.g. a region's bytes).
        dst: 1-D ``uint8`` bytes, written in place.
        pairs: ``[n, 2]`` integer (source block, destination block); destinations unique.
        block_bytes: bytes per block.
        src_stride: bytes from one source block to the next (default ``block_bytes``).
        dst_stride: bytes from one destination block to the next (default ``block_bytes``).
        src_offset: byte offset of source block 0.
        dst_offset: byte offset of destination block 0.
    """
    src_stride = block_bytes if src_stride is None else src_stride
    dst_stride = block_bytes if dst_stride is None else dst_stride
    if pairs.shape[0] == 0 or block_bytes == 0:
        return
    pairs = pairs.long().to(src.device)
    col = torch.arange(block_bytes, device=src.device)
    src_idx = (src_offset + pairs[:, 0:1] * src_stride + col).flatten()
    dst_idx = (dst_offset + pairs[:, 1:2] * dst_stride + col).flatten()
    dst[dst_idx] = src[src_idx]


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of ``m`` queries, the last ``m`` of ``n`` positions, in fp32 (fp64 for
    fp64 inputs).

    ``query`` ``[m, Hq, D]``, ``key``/``value`` ``[n, Hkv, D]`` (``n >= m``): query ``i`` sits
    at position ``n - m + i`` and attends to keys ``0 ..= n - m + i``. Returns ``[m, Hq, D]``
    in ``query``'s dtype.
    """
    m, n = query.shape[0], key.shape[0]
    wide = torch.promote_types(query.dtype, torch.float32)
    q, k, v = (t.to(wide).transpose(0, 1) for t in (query, key, value))  # [H, tokens, D]
    rows = torch.arange(m, device=query.device)[:, None] + (n - m)
    mask = torch.arange(n, device=query.device)[None, :] <= rows  # [m, n]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1).to(query.dtype)


def paged_attention_decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new query per sequence attends to the sequence's whole context in the pages.

    Args:
        query: ``[b, Hq, D]``, ``Hq`` a multiple of ``Hkv``.
        kv_layer: ``[num_blocks, 2, bs, Hkv, D]`` (``PagedKVCache.layer(l)``, may be strided).
        block_tables: ``[b, max_blocks]`` integer; row ``s`` lists sequence ``s``'s blocks.
        context_lens: ``[b]`` integer, tokens of each sequence in the cache (``>= 1``),
            the query's own token included.
        scale: factor on ``q . k`` before the softmax.

    Returns:
        ``[b, Hq, D]`` in ``query``'s dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    cu = torch.arange(query.shape[0] + 1, dtype=torch.int64)
    return paged_attention_prefill(query, kv_layer, block_tables, cu, context_lens, scale)


def paged_attention_prefill(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (its last ``q_len`` positions) over its
    whole prefix in the pages (chunked prefill).

    Args:
        query: ``[total_q, Hq, D]``, sequences concatenated; ``Hq`` a multiple of ``Hkv``.
        kv_layer: ``[num_blocks, 2, bs, Hkv, D]`` (``PagedKVCache.layer(l)``, may be strided).
        block_tables: ``[b, max_blocks]`` integer.
        cu_seqlens_q: ``[b + 1]`` integer; sequence ``s``'s queries are rows
            ``cu_seqlens_q[s] .. cu_seqlens_q[s + 1]``.
        context_lens: ``[b]`` integer, tokens in the cache per sequence, the new ones included
            (``>= q_len``).
        scale: factor on ``q . k`` before the softmax.

    Returns:
        ``[total_q, Hq, D]`` in ``query``'s dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    lens = [int(n) for n in context_lens.tolist()]
    cu = [int(x) for x in cu_seqlens_q.tolist()]
    key, value = kv_gather(kv_layer, block_tables, lens)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    start = 0
    for s, n in enumerate(lens):
        q = query[cu[s] : cu[s + 1]]
        if q.shape[0]:
            out[cu[s] : cu[s + 1]] = _attend(
                q, key[start : start + n], value[start : start + n], scale
            )
        start += n
    return out
