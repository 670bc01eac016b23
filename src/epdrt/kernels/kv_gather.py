# SPDX-License-Identifier: Apache-2.0
"""KV gather: read sequences' pages into contiguous K/V tensors (dispatcher and checks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from epdrt.errors import InvalidArgument
from epdrt.kernels import reference as refs

from . import _common as c


def _lengths(seq_lens: object, num_seqs: int) -> list[int]:
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dim() != 1 or seq_lens.dtype.is_floating_point or seq_lens.is_complex():
            raise InvalidArgument(
                "seq_lens must be a 1-D integer tensor, got"
                f" {seq_lens.dtype} {list(seq_lens.shape)}"
            )
        lens = [int(x) for x in seq_lens.tolist()]
    elif isinstance(seq_lens, Sequence) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in seq_lens
    ):
        lens = list(seq_lens)
    else:
        raise InvalidArgument(f"seq_lens must be a sequence of ints or a tensor, got {seq_lens!r}")
    if len(lens) != num_seqs:
        raise InvalidArgument(f"seq_lens has {len(lens)} entries; block_tables has {num_seqs} rows")
    if any(x < 0 for x in lens):
        raise InvalidArgument(f"seq_lens must be >= 0, got {lens}")
    return lens


def kv_gather(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: c.Backend = "auto",
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies the K/V of a set of sequences out of the pages, sequences concatenated in order.

    Args:
        kv_cache: ``[num_blocks, 2, bs, H, D]`` (one layer, may be strided) or
            ``[num_blocks, L, 2, bs, H, D]``; ``[H, D]`` packed.
        block_tables: ``[S, max_blocks]`` int64 or int32 on the cache's device, unit stride in
            the last dim; row ``s`` holds sequence ``s``'s blocks in token order. Entries past
            its first ``ceil(seq_lens[s] / bs)`` are never read (padding may be anything).
        seq_lens: ``S`` token counts (ints, or an integer tensor: read on the host).
        out: optional ``(key, value)`` to fill, contiguous, shape as returned, cache dtype.
        backend: "auto" (Triton on CUDA, the torch reference on CPU), "triton" or "torch".
        check_indices: check that the blocks read are in ``[0, num_blocks)`` (one device sync).

    Returns:
        ``(key, value)``: ``[T, H, D]`` each for a one-layer cache, else ``[L, T, H, D]``;
        ``T = sum(seq_lens)``; token ``j`` of sequence ``s`` is row ``sum(seq_lens[:s]) + j``.

    Raises:
        InvalidArgument: before any launch, for bad shapes, dtypes, devices, strides or blocks.
    """
    cache, one_layer = c.kv_cache_6d(kv_cache)
    num_blocks, num_layers, _, bs, heads, dim = cache.shape
    tables = c.tensor(
        "block_tables", block_tables, 2, dtype=(torch.int64, torch.int32), device=cache.device
    )
    if tables.shape[1] > 1 and tables.stride(1) != 1:
        raise InvalidArgument(f"block_tables' last dim must have stride 1, got {tables.stride()}")
    lens = _lengths(seq_lens, tables.shape[0])
    blocks_needed = [-(-n // bs) for n in lens]
    if max(blocks_needed, default=0) > tables.shape[1]:
        raise InvalidArgument(
            f"a sequence of {max(lens)} tokens needs {max(blocks_needed)} blocks of {bs};"
            f" block_tables has {tables.shape[1]} columns"
        )
    total = sum(lens)
    shape = (total, heads, dim) if one_layer else (num_layers, total, heads, dim)
    if out is None:
        key = torch.empty(shape, dtype=cache.dtype, device=cache.device)
        value = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise InvalidArgument("out must be a (key, value) pair of tensors")
        key, value = out
        for name, t in (("out key", key), ("out value", value)):
            c.tensor(name, t, len(shape), device=cache.device)
            c.shape_is(name, t, shape)
            c.same_dtype(name, t, "kv_cache", cache)
            c.contiguous(name, t)
    if check_indices and total:
        used = torch.arange(tables.shape[1], device=cache.device)[None, :] < torch.tensor(
            blocks_needed, device=cache.device
        ).unsqueeze(1)
        c.in_range("block_tables (used entries)", tables[used], 0, num_blocks)
    if c.choose(backend, cache.device) == "torch":
        k, v = refs.kv_gather(kv_cache, tables, lens)
        key.copy_(k)
        value.copy_(v)
        return key, value
    kernel = c.triton_module("kv_gather", cache.device)
    if len(lens) > kernel.MAX_GRID_YZ or num_layers > kernel.MAX_GRID_YZ:
        raise InvalidArgument(
            f"at most {kernel.MAX_GRID_YZ} sequences and layers per call, got {len(lens)} and"
            f" {num_layers}"
        )
    cu = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(cache.device)
    k6, v6 = (key.unsqueeze(0), value.unsqueeze(0)) if one_layer else (key, value)
    max_len = max(lens, default=0)
    with c.on_device(cache.device):
        kernel.launch(c.as_bits(cache), tables, cu, max_len, c.as_bits(k6), c.as_bits(v6))
    return key, value
