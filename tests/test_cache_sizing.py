# SPDX-License-Identifier: Apache-2.0
"""Cache sizing (epdrt.cache.sizing): a token budget becomes whole blocks, the same way for
the workers, the router's fit check, the profiler and the capacity benchmark."""

from __future__ import annotations

import pytest
import torch

from epdrt.cache import sizing
from epdrt.models.types import ModelSpec


@pytest.mark.parametrize(
    ("tokens", "block", "blocks"), [(1, 16, 1), (16, 16, 1), (17, 16, 2), (100, 32, 4)]
)
def test_blocks_for_rounds_up(tokens, block, blocks):
    assert sizing.blocks_for(tokens, block) == blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "block"), [(100, 16), (64, 32)])
def test_caches_hold_the_budget_in_whole_blocks(tiny_model_dir, tokens, block, dtype):
    from epdrt.models import load_adapter

    spec: ModelSpec = load_adapter(tiny_model_dir("llava"), stages=()).spec
    kv = sizing.kv_cache(spec, tokens, block, dtype)
    mm = sizing.mm_cache(spec, tokens, block, dtype)
    blocks = -(-tokens // block)
    assert kv.num_blocks == mm.num_blocks == blocks
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (
        spec.num_layers, spec.num_kv_heads, spec.head_dim,
    )  # fmt: skip
    assert mm.hidden_size == spec.hidden_size and kv.dtype == mm.dtype == dtype
    # A peer's view over the same region has the same layout.
    peer = sizing.kv_cache(spec, tokens, block, dtype, region=kv.region)
    assert peer.storage.shape == kv.storage.shape
