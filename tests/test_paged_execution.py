# SPDX-License-Identifier: Apache-2.0
"""Paged execution: ``FlatBatch`` metadata and its errors, the attention hook, chunked prefill
of a long prompt, and the runtime's continuous batching over the pages (32 requests of mixed
lengths joining and leaving, chunked prompts, block boundaries, an abort mid-decode) giving the
tokens of ``generate()``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from model_utils import make_image, reference_tokens, staged_generate

from epdrt import InvalidArgument
from epdrt.cache import PagedKVCache, sizing
from epdrt.models import FlatBatch, load_adapter, make_tiny_model
from epdrt.models.paged import paged_attention_forward
from epdrt.runtime import EPDCluster, EPDConfig, Request

TIMEOUT_S = 120.0


def _cache(num_blocks: int = 16, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(2, 2, 8, block_size, num_blocks, torch.float32)


def test_flat_batch_metadata():
    """Slots, tables, lengths and offsets of a mixed step: a new prompt, a chunk of a prompt
    reserved whole, and a decode token crossing into a new block."""
    kv = _cache()
    kv.extend("prompt", 6)
    kv.extend("chunked", 10)  # prefilled 4..7 this step
    kv.extend("decoding", 4)
    kv.extend("decoding", 1)  # its 5th token starts its second block
    batch = FlatBatch.build(kv, [("prompt", 6), ("chunked", 4, 4), ("decoding", 1)])
    tables = {s: kv.block_table(s) for s in ("prompt", "chunked", "decoding")}

    def slot(seq: str, pos: int) -> int:
        return tables[seq][pos // 4] * 4 + pos % 4

    want = [slot("prompt", p) for p in range(6)] + [slot("chunked", p) for p in range(4, 8)]
    want.append(slot("decoding", 4))
    assert batch.slot_mapping.tolist() == want
    assert batch.cu_seqlens_q.tolist() == [0, 6, 10, 11]
    assert batch.context_lens.tolist() == [6, 8, 5]
    assert batch.starts.tolist() == [0, 4, 4] and batch.last_rows.tolist() == [5, 9, 10]
    assert batch.block_tables.dtype == batch.slot_mapping.dtype == torch.int32
    assert batch.block_tables.shape == (3, 3)
    for row, seq in zip(batch.block_tables.tolist(), tables):
        assert row[: len(tables[seq])] == tables[seq]
    assert (batch.max_query_len, batch.max_context_len, batch.is_decode) == (6, 8, False)
    assert FlatBatch.build(kv, [("decoding", 1), ("prompt", 1)]).is_decode


def test_flat_batch_errors_before_any_launch():
    kv = _cache()
    kv.extend("a", 5)
    with pytest.raises(InvalidArgument, match="at least one sequence"):
        FlatBatch.build(kv, [])
    with pytest.raises(InvalidArgument, match="6 new tokens at position -1, but the cache holds 5"):
        FlatBatch.build(kv, [("a", 6)])
    with pytest.raises(InvalidArgument, match="at least one new token per sequence"):
        FlatBatch.build(kv, [("a", 0)])
    with pytest.raises(InvalidArgument, match="3 new tokens at position 3, but the cache holds 5"):
        FlatBatch.build(kv, [("a", 3, 3)])
    with pytest.raises(KeyError, match="unknown sequence 'b'"):
        FlatBatch.build(kv, [("b", 1)])
    ids, q, starts = ("a",), np.array([5]), np.array([0])
    table = np.array([kv.block_table("a")])
    slots = np.arange(5)
    with pytest.raises(InvalidArgument, match="slot_mapping has 4 entries; the batch has 5"):
        FlatBatch.from_host(kv, ids, q, starts, slots[:4], table)
    outside = table.copy()
    outside[0, 1] = kv.num_blocks
    with pytest.raises(InvalidArgument, match="points outside the cache's"):
        FlatBatch.from_host(kv, ids, q, starts, slots, outside)
    with pytest.raises(InvalidArgument, match="too short"):
        FlatBatch.from_host(kv, ids, q, starts, slots, table[:, :1])
    with pytest.raises(InvalidArgument, match="slot_mapping points outside"):
        FlatBatch.from_host(kv, ids, q, starts, slots + kv.num_blocks * 4, table)


def test_attention_without_a_flat_batch_says_what_it_needs():
    q = torch.zeros(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(InvalidArgument, match="needs a FlatBatch passed as epdrt_batch="):
        paged_attention_forward(module, q, q, q, None)


@pytest.fixture(scope="module")
def small_llava(tmp_path_factory):
    """A CPU-sized LLaVA with an 8k context (random weights drawn at load)."""
    path = tmp_path_factory.mktemp("small-llava")
    make_tiny_model(path, "llava", size="small")
    return load_adapter(path)


@pytest.mark.parametrize("chunk", [256, 1000])
def test_a_long_prompt_prefilled_in_chunks_gives_the_tokens_of_generate(small_llava, chunk):
    """A 1,300-token prompt in chunks that attend to the earlier chunks in the pages."""
    adapter = small_llava
    req = adapter.tokenize(" ".join(f"w{i % 50}" for i in range(1300)), max_new_tokens=6)
    assert req.num_tokens > 1024
    got = staged_generate(adapter, adapter, [req], 6, chunk=chunk)
    assert got == reference_tokens(adapter, [req], 6)


def _mixed_requests(ph: str) -> list[Request]:
    """32 requests: text prompts of 1..~90 words and image prompts, 1..12 new tokens."""
    out = []
    for i in range(32):
        new = 1 + (i * 5) % 12
        if i % 3 == 0:
            out.append(
                Request(f"USER: {ph} item {i} ASSISTANT:", [make_image(40, 30, 900 + i)], new)
            )
        else:
            out.append(Request(" ".join(f"t{j}" for j in range(1 + (i * 7) % 90)), [], new))
    return out


@pytest.mark.parametrize("mode", ["aggregated", "epd"])
def test_32_mixed_requests_join_and_leave_the_decode_batch(tiny_model_dir, mode):
    """Chunked prefill (24-token budget), 4-token blocks (some prompts fill their last block,
    so their first decode token takes a new one), continuous batching of up to 32."""
    model = tiny_model_dir("llava")
    adapter = load_adapter(model)
    requests = _mixed_requests(adapter.spec.image_placeholder)
    prepared = [adapter.prepare(r.prompt, r.images) for r in requests]
    assert any(p.num_tokens % 4 == 0 for p in prepared)  # a block boundary at decode
    assert sum(p.num_tokens > 24 for p in prepared) > 8  # prompts that take several chunks
    expected = {
        r.id: reference_tokens(adapter, [p], r.max_new_tokens)[0]
        for r, p in zip(requests, prepared)
    }
    config = EPDConfig(
        mode=mode, kv_block_size=4, prefill_max_batch_tokens=24, decode_max_batch=32,
        request_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    with EPDCluster.launch(model, config) as cluster:
        results = cluster.generate(requests)
    stats = cluster.worker_stats()  # reported at shutdown
    for r in results:
        assert r.error is None, r.error
        assert r.token_ids == expected[r.id], r.id
    assert sum(s.get("prefill_chunks", 0) for s in stats.values()) > 0
    in_use = [v for s in stats.values() for k, v in s.items() if k == "kv_blocks_in_use"]
    assert in_use and set(in_use) == {0.0}


def test_a_request_aborted_mid_decode_frees_its_blocks(tiny_model_dir):
    model = tiny_model_dir("llava")
    adapter = load_adapter(model)
    other = Request("a request that runs to its end", [], 8)
    expected = reference_tokens(adapter, [adapter.prepare(other.prompt, [])], 8)[0]
    config = EPDConfig(mode="epd", request_timeout_s=TIMEOUT_S)
    started = threading.Event()

    def on_token(_, token):
        started.set()

    with EPDCluster.launch(model, config) as cluster:
        victim = cluster.submit(Request("to be aborted " * 20, [], 400), on_token=on_token)
        assert started.wait(TIMEOUT_S)
        victim.cancel()
        result = cluster.submit(other).result(timeout=TIMEOUT_S)
    stats = cluster.worker_stats()  # reported at shutdown
    assert victim.cancelled()
    assert result.error is None and result.token_ids == expected
    in_use = [v for s in stats.values() for k, v in s.items() if k == "kv_blocks_in_use"]
    assert in_use and set(in_use) == {0.0}


def test_decode_step_memory_grows_by_one_layer_of_context_at_most(small_llava):
    """A decode step's peak allocations over its inputs: weights and caches are already there;
    what grows with the batch's context is one layer's gathered K/V (the CPU path), never a
    copy of every layer's (the dense path copied the whole batch's KV twice per step)."""
    from epdrt.bench._capacity_probe import Meter

    adapter, spec = small_llava, small_llava.spec
    layer_bytes_per_token = 2 * spec.num_kv_heads * spec.head_dim * 4  # K and V, float32
    batch_size = 8

    def peak(context: int) -> int:
        kv = sizing.kv_cache(spec, batch_size * (context + 32), 16, adapter.dtype)
        for s in range(batch_size):
            kv.reserve(s, context + 1)
        batch = FlatBatch.build(kv, [(s, 1) for s in range(batch_size)])
        ids = torch.zeros(batch_size, dtype=torch.long)
        extras = [{}] * batch_size
        with torch.inference_mode():
            return Meter(torch.device("cpu")).peak_during(
                lambda: adapter.forward(adapter.embed(ids), batch, extras)
            )

    growth = (peak(1152) - peak(128)) / (batch_size * 1024)  # bytes per context token
    assert spec.num_layers >= 4
    assert growth <= 1.25 * layer_bytes_per_token, growth / layer_bytes_per_token
