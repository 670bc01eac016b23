# SPDX-License-Identifier: Apache-2.0
"""Cache sizing in one place: blocks from tokens, and a model's caches from token budgets.

The runtime's workers, the router's fit check, the profiler and the capacity benchmark all
size caches here, so they agree on what a budget of tokens holds.
"""

from __future__ import annotations

import torch

from epdrt.cache.kv_cache import PagedKVCache
from epdrt.cache.mm_cache import MMTokenCache
from epdrt.models.types import ModelSpec
from epdrt.region import Region


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of ``block_size`` tokens that ``tokens`` tokens take (rounded up)."""
    return -(-tokens // block_size)


def mm_cache(
    spec: ModelSpec,
    cache_tokens: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    region: Region | None = None,
) -> MMTokenCache:
    """The MM-token cache holding ``cache_tokens`` tokens (rounded up to whole blocks), in a
    new region on ``device`` or over ``region`` (a peer's, opened here)."""
    blocks = blocks_for(cache_tokens, block_size)
    return MMTokenCache(spec.hidden_size, block_size, blocks, dtype, device, region=region)


def kv_cache(
    spec: ModelSpec,
    cache_tokens: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    region: Region | None = None,
) -> PagedKVCache:
    """The paged KV cache holding ``cache_tokens`` tokens (rounded up to whole blocks)."""
    return PagedKVCache(
        spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size,
        blocks_for(cache_tokens, block_size), dtype, device, region=region,
    )  # fmt: skip
