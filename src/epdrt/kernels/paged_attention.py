# SPDX-License-Identifier: Apache-2.0
"""Paged attention over one layer of the paged KV cache: decode and chunked causal prefill.

Both are ``torch.library`` custom ops (``epdrt::paged_attention_decode``,
``epdrt::paged_attention_prefill``) with fake implementations, so a model compiled with
``torch.compile`` keeps them as single opaque calls. The Python functions here check the
arguments (``InvalidArgument`` before any launch) and call the ops.

NOTE: unless told the longest context (and, for prefill, the longest query run), the block
tables, context lengths and query offsets are checked on the host once per call: one
device-to-host copy of a few small tensors (the only sync), inside the op, so a compiled graph
does not break on it. ``check_indices=False`` skips the block-range part of that check; with it
and ``max_context_len`` (``max_query_len``) given, a call does not sync at all: what a runtime
does after checking its step's metadata once on the host (``epdrt.models.paged.FlatBatch``).

Backends: "triton" (the CUDA default), "native" (decode on CPU tensors: the C++ core's
``paged_decode_host``, which reads K/V in place, the CPU default for decode) and "torch"
(``epdrt.kernels._torch.paged_attention``: the CPU default for prefill, and decode's fallback).
The references in ``epdrt.kernels.reference`` serve tests only.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from epdrt import _core
from epdrt.errors import InvalidArgument

from . import _common as c
from ._torch import paged_attention as torch_impl

AttentionBackend = Literal["auto", "native", "triton", "torch"]
#: Element type codes of ``_core.paged_decode_host``.
_HOST_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_shapes(
    query: object,
    kv_layer: object,
    block_tables: object,
    context_lens: object,
    cu_seqlens_q: object | None,
) -> None:
    """Checks ranks, shapes, dtypes, devices and strides: no data is read (fake-tensor safe)."""
    q = c.tensor("query", query, 3, dtype=_FLOATS)
    device = q.device
    kv = c.tensor("kv_layer", kv_layer, 5, device=device)
    c.same_dtype("kv_layer", kv, "query", q)
    two, _, num_kv_heads, head_dim = kv.shape[1:]
    if two != 2:
        raise InvalidArgument(
            f"kv_layer must be [num_blocks, 2, block_size, Hkv, D], got shape {list(kv.shape)}"
        )
    if q.shape[2] != head_dim:
        raise InvalidArgument(f"query has head dim {q.shape[2]}; kv_layer has {head_dim}")
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads:
        raise InvalidArgument(
            f"query heads ({q.shape[1]}) must be a multiple of kv_layer's heads ({num_kv_heads})"
        )
    for name, t in (("query", q), ("kv_layer", kv)):
        if head_dim > 1 and t.stride(-1) != 1:
            raise InvalidArgument(f"{name}'s head dim must have stride 1, got {t.stride()}")
    tables = c.tensor("block_tables", block_tables, 2, dtype=torch.int32, device=device)
    if tables.shape[1] > 1 and tables.stride(1) != 1:
        raise InvalidArgument(f"block_tables' last dim must have stride 1, got {tables.stride()}")
    batch = tables.shape[0]
    lens = c.tensor("context_lens", context_lens, 1, dtype=torch.int32, device=device)
    c.shape_is("context_lens", lens, (batch,))
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise InvalidArgument(
                f"query has {q.shape[0]} rows; decode takes one per sequence ({batch})"
            )
    else:
        cu = c.tensor("cu_seqlens_q", cu_seqlens_q, 1, dtype=torch.int32, device=device)
        c.shape_is("cu_seqlens_q", cu, (batch + 1,))


def _check_metadata(
    kv: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    total_q: int,
    check_indices: bool,
) -> tuple[int, int]:
    """Checks the metadata's values (one device-to-host copy).

    Returns the largest query count and the largest context length of a sequence.
    """
    num_blocks, _, bs = kv.shape[:3]
    batch, width = tables.shape
    parts = [context_lens.long()]
    if cu_seqlens_q is not None:
        parts.append(cu_seqlens_q.long())
    bad = None
    if check_indices and batch and width:
        need = (context_lens.long().clamp(min=0) + bs - 1) // bs
        used = torch.arange(width, device=tables.device)[None, :] < need[:, None]
        bad = used & ((tables < 0) | (tables >= num_blocks))
        parts.append(bad.any().long()[None])
    host = torch.cat(parts).tolist()
    lens = host[:batch]
    if any(n < 0 for n in lens):
        raise InvalidArgument(f"context_lens must be >= 0, got {lens}")
    if max(lens, default=0) > width * bs:
        s = max(range(batch), key=lambda i: lens[i])
        raise InvalidArgument(
            f"context_lens[{s}] = {lens[s]} tokens need {-(-lens[s] // bs)} blocks of {bs};"
            f" block_tables has {width} columns"
        )
    if cu_seqlens_q is None:
        q_lens = [1] * batch
        if any(n < 1 for n in lens):
            raise InvalidArgument(
                f"decode context_lens must be >= 1 (the query's own token is cached), got {lens}"
            )
    else:
        cu = host[batch : 2 * batch + 1]
        q_lens = [b - a for a, b in itertools.pairwise(cu)]
        if cu[0] != 0 or cu[-1] != total_q or any(n < 0 for n in q_lens):
            raise InvalidArgument(f"cu_seqlens_q must rise from 0 to total_q = {total_q}, got {cu}")
        short = [s for s in range(batch) if q_lens[s] > lens[s]]
        if short:
            s = short[0]
            raise InvalidArgument(
                f"sequence {s} has {q_lens[s]} queries but context_lens[{s}] = {lens[s]}: the"
                " cache must already hold the new tokens"
            )
    if bad is not None and host[-1]:
        s, j = (int(x) for x in bad.nonzero()[0].tolist())
        raise InvalidArgument(
            f"block_tables[{s}, {j}] = {int(tables[s, j])} is outside the cache's"
            f" [0, {num_blocks}) blocks"
        )
    return max(q_lens, default=0), max(lens, default=0)


def _resolve(backend: str, device: torch.device, decode: bool) -> str:
    """ "native", "triton" or "torch" for a call on ``device``: "auto" is Triton on CUDA, the
    host kernel (decode) or torch (prefill) on CPU; "native" prefill runs torch (there is no
    host prefill kernel)."""
    chosen = c.choose_native(backend, device)
    return "torch" if chosen == "native" and not decode else chosen


def _native_decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = _new_output(query)
    lens = context_lens.contiguous()
    batch, num_heads, head_dim = query.shape
    _core.paged_decode_host(
        query.data_ptr(), query.stride(0), query.stride(1), kv_layer.data_ptr(),
        *kv_layer.stride()[:4], block_tables.data_ptr(), block_tables.stride(0),
        lens.data_ptr(), out.data_ptr(), batch, num_heads, kv_layer.shape[3], head_dim,
        kv_layer.shape[2], scale, _HOST_TYPES[query.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return out


def _new_output(query: torch.Tensor) -> torch.Tensor:
    """The kernels' output: every element is written (tests poison it through this hook)."""
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def _plain_eager(query: torch.Tensor) -> bool:
    """Whether a call may skip the op dispatcher (tens of microseconds a call on CPU): a plain
    tensor, no torch.compile, no dispatch mode (fake tensors, tracing). Otherwise the op keeps
    the kernel one opaque node."""
    return (
        type(query) is torch.Tensor
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidArgument(f"scale must be a float, got {type(scale).__name__}")
    return float(scale)


def _decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    backend: str,
    check_indices: bool,
    max_context_len: int,
) -> torch.Tensor:
    """The decode op's body, shapes already checked."""
    max_len = max_context_len
    if check_indices or max_len < 0:
        _, max_len = _check_metadata(
            kv_layer, block_tables, context_lens, None, query.shape[0], check_indices
        )
    chosen = _resolve(backend, query.device, decode=True)
    if chosen == "native":
        return _native_decode(query, kv_layer, block_tables, context_lens, scale)
    if chosen == "torch":
        return torch_impl.decode(query, kv_layer, block_tables, context_lens, max_len, scale)
    kernel = c.triton_module("paged_attention", query.device)
    if kv_layer.shape[3] > kernel.MAX_GRID_YZ:
        raise InvalidArgument(f"at most {kernel.MAX_GRID_YZ} KV heads, got {kv_layer.shape[3]}")
    out = _new_output(query)
    with c.on_device(query.device):
        kernel.launch_decode(query, kv_layer, block_tables, context_lens, max_len, scale, out)
    return out


@torch.library.custom_op("epdrt::paged_attention_decode", mutates_args=())
def _decode_op(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    backend: str,
    check_indices: bool,
    max_context_len: int = -1,
) -> torch.Tensor:
    _check_shapes(query, kv_layer, block_tables, context_lens, None)
    return _decode(
        query, kv_layer, block_tables, context_lens, scale, backend, check_indices,
        max_context_len,
    )  # fmt: skip


@_decode_op.register_fake
def _decode_fake(
    query, kv_layer, block_tables, context_lens, scale, backend, check_indices, max_context_len=-1
):
    _check_shapes(query, kv_layer, block_tables, context_lens, None)
    return query.new_empty(query.shape)


def _prefill(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    backend: str,
    check_indices: bool,
    max_query_len: int,
) -> torch.Tensor:
    """The prefill op's body, shapes already checked."""
    max_q_len = max_query_len
    if check_indices or max_q_len < 0:
        max_q_len, _ = _check_metadata(
            kv_layer, block_tables, context_lens, cu_seqlens_q, query.shape[0], check_indices
        )
    if _resolve(backend, query.device, decode=False) == "torch":
        return torch_impl.prefill(query, kv_layer, block_tables, cu_seqlens_q, context_lens, scale)
    kernel = c.triton_module("paged_attention", query.device)
    if block_tables.shape[0] > kernel.MAX_GRID_YZ or kv_layer.shape[3] > kernel.MAX_GRID_YZ:
        raise InvalidArgument(
            f"at most {kernel.MAX_GRID_YZ} sequences and KV heads per call, got"
            f" {block_tables.shape[0]} and {kv_layer.shape[3]}"
        )
    out = _new_output(query)
    with c.on_device(query.device):
        kernel.launch_prefill(
            query, kv_layer, block_tables, cu_seqlens_q, context_lens, max_q_len, scale, out
        )
    return out


@torch.library.custom_op("epdrt::paged_attention_prefill", mutates_args=())
def _prefill_op(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    backend: str,
    check_indices: bool,
    max_query_len: int = -1,
) -> torch.Tensor:
    _check_shapes(query, kv_layer, block_tables, context_lens, cu_seqlens_q)
    return _prefill(
        query, kv_layer, block_tables, cu_seqlens_q, context_lens, scale, backend,
        check_indices, max_query_len,
    )  # fmt: skip


@_prefill_op.register_fake
def _prefill_fake(
    query,
    kv_layer,
    block_tables,
    cu_seqlens_q,
    context_lens,
    scale,
    backend,
    check_indices,
    max_query_len=-1,
):
    _check_shapes(query, kv_layer, block_tables, context_lens, cu_seqlens_q)
    return query.new_empty(query.shape)


def paged_attention_decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    backend: AttentionBackend = "auto",
    check_indices: bool = True,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over its whole context in the pages.

    Args:
        query: ``[b, Hq, D]`` fp32, fp16 or bf16, unit stride in D; ``Hq`` a multiple of
            ``Hkv`` (grouped-query attention: query head ``h`` reads KV head ``h // (Hq/Hkv)``).
        kv_layer: ``[num_blocks, 2, bs, Hkv, D]``, the query's dtype and device, unit stride in
            D, any other strides: e.g. ``PagedKVCache.layer(l)``, a view of the cache storage.
        block_tables: ``[b, max_blocks]`` int32, unit stride in its last dim; row ``s`` lists
            sequence ``s``'s blocks in token order. Entries past ``ceil(context_lens[s] / bs)``
            are never read (padding may be anything).
        context_lens: ``[b]`` int32, tokens of each sequence in the cache (``>= 1``), the new
            token's own K/V included.
        scale: factor on ``q . k`` before the softmax (default ``D ** -0.5``).
        backend: "auto" (Triton on CUDA, "native" on CPU), "native" (the C++ host kernel:
            K/V read in place, fp32 math, the caller's torch thread count), "triton" or
            "torch".
        check_indices: check that the blocks read are in ``[0, num_blocks)``.
        max_context_len: ``max(context_lens)``, when the caller knows it; with
            ``check_indices=False`` the call then reads nothing back from the device (values
            are trusted: the caller checked them).

    Returns:
        ``[b, Hq, D]`` contiguous, the query's dtype; scores, softmax and sums in fp32
        (Triton, native), SDPA in the query's dtype (torch).

    Raises:
        InvalidArgument: before any launch, for bad shapes, dtypes, devices, strides, lengths
            or blocks.
    """
    _check_shapes(query, kv_layer, block_tables, context_lens, None)
    op = _decode if _plain_eager(query) else torch.ops.epdrt.paged_attention_decode
    return op(
        query,
        kv_layer,
        block_tables,
        context_lens,
        _scale(scale, query.shape[2]),
        backend,
        check_indices,
        -1 if max_context_len is None else int(max_context_len),
    )


def paged_attention_prefill(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    backend: AttentionBackend = "auto",
    check_indices: bool = True,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole prefix in the pages.

    A sequence's ``q_len`` queries are its last ``q_len`` positions: query ``i`` sits at
    position ``context_lens[s] - q_len + i`` and attends to positions ``0 ..=`` that one
    (chunked prefill: the earlier chunks' K/V are read from the pages like the new ones).

    Args:
        query: ``[total_q, Hq, D]``, sequences concatenated; otherwise as in
            :func:`paged_attention_decode`.
        kv_layer: as in :func:`paged_attention_decode`; the new tokens' K/V already written.
        block_tables: ``[b, max_blocks]`` int32, as in :func:`paged_attention_decode`.
        cu_seqlens_q: ``[b + 1]`` int32, from 0 up to ``total_q``: sequence ``s``'s queries are
            rows ``cu_seqlens_q[s] .. cu_seqlens_q[s + 1]`` (a sequence may have none).
        context_lens: ``[b]`` int32, tokens in the cache per sequence, the new ones included
            (``>= q_len``).
        scale: factor on ``q . k`` before the softmax (default ``D ** -0.5``).
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch" ("native"
            runs torch: there is no host prefill kernel).
        check_indices: check that the blocks read are in ``[0, num_blocks)``.
        max_query_len: the most queries of one sequence, when the caller knows it; with
            ``check_indices=False`` the call then reads nothing back from the device.

    Returns:
        ``[total_q, Hq, D]`` contiguous, the query's dtype; computed in fp32 (Triton), SDPA
        in the query's dtype (torch).

    Raises:
        InvalidArgument: before any launch, for bad shapes, dtypes, devices, strides, lengths
            or blocks.
    """
    _check_shapes(query, kv_layer, block_tables, context_lens, cu_seqlens_q)
    op = _prefill if _plain_eager(query) else torch.ops.epdrt.paged_attention_prefill
    return op(
        query,
        kv_layer,
        block_tables,
        cu_seqlens_q,
        context_lens,
        _scale(scale, query.shape[2]),
        backend,
        check_indices,
        -1 if max_query_len is None else int(max_query_len),
    )
