# SPDX-License-Identifier: Apache-2.0
"""PagedKVCache: append/read round trips against plain concatenation, back-pressure, bad input."""

import pytest
import torch

from epdrt import InvalidArgument, PagedKVCache, PoolExhausted, Region

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [1, 16, 64]
LAYERS, HEADS, HEAD_DIM = 3, 2, 8


def make_cache(block_size=16, num_blocks=64, dtype=torch.float16, **kw):
    return PagedKVCache(LAYERS, HEADS, HEAD_DIM, block_size, num_blocks, dtype, **kw)


def random_kv(n, dtype, gen):
    shape = (LAYERS, n, HEADS, HEAD_DIM)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("chunks", [[1], [17, 1, 1], [33, 31], [64, 1]])
def test_append_then_read_matches_concatenation(dtype, block_size, chunks):
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(block_size, num_blocks=2 * 96 // block_size + 4, dtype=dtype)
    expected = {}
    for seq in ("a", "b"):  # interleave two sequences so their blocks mix
        expected[seq] = ([], [])
    for n in chunks:
        for seq in ("a", "b"):
            k, v = random_kv(n, dtype, gen)
            cache.append(seq, k, v)
            expected[seq][0].append(k)
            expected[seq][1].append(v)
    for seq, (ks, vs) in expected.items():
        k_ref, v_ref = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        assert cache.seq_len(seq) == k_ref.shape[1]
        k, v = cache.read(seq)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        k1, v1 = cache.read(seq, layer=1)
        assert torch.equal(k1, k_ref[1]) and torch.equal(v1, v_ref[1])
        assert len(cache.block_table(seq)) == -(-k_ref.shape[1] // block_size)


def test_slots_follow_the_block_table():
    cache = make_cache(block_size=4)
    slots = cache.reserve("s", 10)
    table = cache.block_table("s")
    expected = [table[i // 4] * 4 + i % 4 for i in range(10)]
    assert slots.tolist() == expected
    more = cache.reserve("s", 3).tolist()  # positions 10, 11, 12
    table = cache.block_table("s")
    assert more == [table[2] * 4 + 2, table[2] * 4 + 3, table[3] * 4]


def test_layout_puts_one_block_of_all_layers_together():
    cache = make_cache(block_size=4, dtype=torch.float32)
    k, v = random_kv(4, torch.float32, torch.Generator().manual_seed(1))
    cache.append("s", k, v)
    (block,) = cache.block_table("s")
    raw = cache.region.tensor(torch.float32, (cache.block_nbytes // 4,), block * cache.block_nbytes)
    page = raw.view(LAYERS, 2, 4, HEADS, HEAD_DIM)
    assert torch.equal(page[:, 0], k) and torch.equal(page[:, 1], v)
    assert cache.layer(2)[block, 1].equal(v[2])


def test_exhaustion_is_back_pressure_and_changes_nothing():
    cache = make_cache(block_size=4, num_blocks=3)
    cache.reserve("a", 9)
    before = (cache.num_free_blocks, cache.seq_len("a"), cache.block_table("a"))
    with pytest.raises(PoolExhausted, match="KV cache full"):
        cache.reserve("a", 4)
    with pytest.raises(PoolExhausted):
        cache.reserve("b", 5)
    assert (cache.num_free_blocks, cache.seq_len("a"), cache.block_table("a")) == before
    assert "b" not in cache
    cache.reserve("a", 3)  # fits the last block exactly
    cache.free("a")
    assert cache.num_free_blocks == 3 and len(cache) == 0


def test_cache_over_a_peer_region_sees_the_same_data():
    owner = make_cache(block_size=8, dtype=torch.bfloat16)
    peer = make_cache(block_size=8, dtype=torch.bfloat16, region=Region.open(owner.region.export()))
    k, v = random_kv(5, torch.bfloat16, torch.Generator().manual_seed(2))
    slots = owner.append("s", k, v)
    assert torch.equal(peer.storage, owner.storage)
    assert torch.equal(peer.layer(0).flatten(0, 2)[0], owner.layer(0).flatten(0, 2)[0])
    assert slots.numel() == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0},
        {"num_kv_heads": -1},
        {"head_dim": 2.0},
        {"block_size": True},
        {"num_blocks": 0},
        {"dtype": torch.int32},
        {"dtype": "float16"},
        {"device": "tpu"},
    ],
)
def test_bad_construction_is_rejected(kwargs):
    args = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4, "num_blocks": 4}
    args.update(kwargs)
    with pytest.raises(InvalidArgument):
        PagedKVCache(**args)


def test_too_small_region_is_rejected():
    with pytest.raises(InvalidArgument, match="needs"):
        make_cache(region=Region.create(1024))


@pytest.mark.parametrize(
    ("key_shape", "dtype", "device"),
    [
        ((LAYERS, 3, HEADS + 1, HEAD_DIM), torch.float16, "cpu"),
        ((LAYERS + 1, 3, HEADS, HEAD_DIM), torch.float16, "cpu"),
        ((3, HEADS, HEAD_DIM), torch.float16, "cpu"),
        ((LAYERS, 3, HEADS, HEAD_DIM), torch.float32, "cpu"),
        ((LAYERS, 3, HEADS, HEAD_DIM), torch.float16, "meta"),
    ],
)
def test_bad_append_changes_nothing(key_shape, dtype, device):
    cache = make_cache()
    key = torch.zeros(key_shape, dtype=dtype, device=device)
    with pytest.raises(InvalidArgument):
        cache.append("s", key, key)
    assert "s" not in cache and cache.num_free_blocks == cache.num_blocks


def test_bad_write_arguments_are_rejected():
    cache = make_cache(block_size=4, num_blocks=2)
    kv = torch.zeros(1, HEADS, HEAD_DIM, dtype=torch.float16)
    with pytest.raises(InvalidArgument, match="layer"):
        cache.write(LAYERS, torch.tensor([0]), kv, kv)
    with pytest.raises(InvalidArgument, match="slots"):
        cache.write(0, torch.tensor([8]), kv, kv)
    with pytest.raises(InvalidArgument, match="slots"):
        cache.write(0, torch.tensor([0], dtype=torch.int16), kv, kv)
    with pytest.raises(KeyError):
        cache.read("missing")
    with pytest.raises(InvalidArgument):
        cache.reserve("s", -1)
    with pytest.raises(InvalidArgument):
        cache.extend("s", 1.5)
