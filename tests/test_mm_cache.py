# SPDX-License-Identifier: Apache-2.0
"""MMTokenCache: content-addressed put/get/release, LRU eviction, back-pressure, bad input."""

import hashlib

import pytest
import torch

from epdrt import InvalidArgument, MMTokenCache, PoolExhausted
from epdrt.cache.mm_cache import MAX_KEY_BYTES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = 24


def key(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=32).digest()


def tokens(n: int, dtype=torch.float16, seed=0) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("num_tokens", [1, 15, 16, 17, 129])
def test_put_get_round_trip(dtype, block_size, num_tokens):
    cache = MMTokenCache(HIDDEN, block_size, 2 * 129 // block_size + 2, dtype)
    data = tokens(num_tokens, dtype)
    entry = cache.put(key("img"), data)
    assert entry.num_tokens == num_tokens and len(entry.blocks) == -(-num_tokens // block_size)
    assert cache.num_free_blocks == cache.num_blocks  # put without hold leaves it evictable
    got = cache.get(key("img"))
    assert torch.equal(got, data)
    assert cache.hold_count(key("img")) == 1
    assert cache.num_free_blocks == cache.num_blocks - len(entry.blocks)
    cache.release(key("img"))
    assert (cache.hits, cache.misses) == (1, 0)


def test_miss_and_int_keys():
    cache = MMTokenCache(HIDDEN, 4, 8)
    assert cache.get(123) is None and cache.misses == 1
    cache.put(123, tokens(5))
    assert 123 in cache and key("123") not in cache
    assert torch.equal(cache.get(123), tokens(5))


def test_put_of_a_cached_key_does_not_copy_again():
    cache = MMTokenCache(HIDDEN, 4, 8)
    first = cache.put(key("a"), tokens(6))
    again = cache.put(key("a"), tokens(6), hold=True)
    assert again == first and cache.hold_count(key("a")) == 1
    with pytest.raises(InvalidArgument, match="content hashes"):
        cache.put(key("a"), tokens(7))


def test_lru_eviction_takes_the_least_recently_released_entry():
    cache = MMTokenCache(HIDDEN, 4, 4)  # room for two 8-token entries
    cache.put(key("a"), tokens(8, seed=1))
    cache.put(key("b"), tokens(8, seed=2))
    cache.get(key("a"))
    cache.release(key("a"))  # a is now more recent than b
    cache.put(key("c"), tokens(8, seed=3))
    assert key("b") not in cache and key("a") in cache and key("c") in cache
    assert cache.evictions == 1
    assert torch.equal(cache.get(key("a")), tokens(8, seed=1))


def test_held_entries_are_never_evicted_and_full_cache_is_back_pressure():
    cache = MMTokenCache(HIDDEN, 4, 4)
    cache.put(key("a"), tokens(8), hold=True)
    cache.put(key("b"), tokens(4), hold=True)
    before = (cache.num_free_blocks, len(cache), cache.pool.hits)
    with pytest.raises(PoolExhausted, match="MM-token cache full"):
        cache.put(key("c"), tokens(8))
    assert (cache.num_free_blocks, len(cache)) == before[:2]
    cache.release(key("a"))
    cache.put(key("c"), tokens(8))  # now a can be evicted
    assert key("a") not in cache and key("b") in cache


def test_blocks_of_an_evicted_entry_are_reused_by_content():
    cache = MMTokenCache(HIDDEN, 4, 3)
    cache.put(key("a"), tokens(12, seed=5))  # 3 blocks
    cache.put(key("b"), tokens(3, seed=6))  # evicts a's first block, so a is gone
    assert key("a") not in cache and cache.evictions == 1
    hits = cache.pool.hits
    cache.put(key("a"), tokens(12, seed=5))  # a's last two blocks are still cached
    assert cache.pool.hits - hits == 2
    assert torch.equal(cache.get(key("a")), tokens(12, seed=5))


def test_oversized_entry_is_a_clear_error():
    cache = MMTokenCache(HIDDEN, 4, 2)
    with pytest.raises(InvalidArgument, match="whole cache"):
        cache.put(key("big"), tokens(9))
    assert len(cache) == 0 and cache.num_free_blocks == 2


@pytest.mark.parametrize("bad_key", [1.0, "name", None, True, (1,)])
def test_wrong_key_type(bad_key):
    cache = MMTokenCache(HIDDEN, 4, 2)
    with pytest.raises(TypeError):
        cache.put(bad_key, tokens(2))
    with pytest.raises(TypeError):
        cache.get(bad_key)


@pytest.mark.parametrize("good_key", [b"x", b"x" * MAX_KEY_BYTES, 0, 2**64 - 1, -(2**63)])
def test_keys_at_the_size_limits_round_trip(good_key):
    cache = MMTokenCache(HIDDEN, 4, 4)
    cache.put(good_key, tokens(6))
    torch.testing.assert_close(cache.get(good_key), tokens(6), rtol=0, atol=0)


@pytest.mark.parametrize("bad_key", [b"", b"x" * (MAX_KEY_BYTES + 1), 2**64])
def test_out_of_range_keys(bad_key):
    with pytest.raises(InvalidArgument):
        MMTokenCache(HIDDEN, 4, 2).put(bad_key, tokens(2))


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, HIDDEN + 1, dtype=torch.float16),
        torch.zeros(2, HIDDEN, dtype=torch.float32),
        torch.zeros(HIDDEN, dtype=torch.float16),
        torch.zeros(0, HIDDEN, dtype=torch.float16),
        torch.zeros(2, HIDDEN, dtype=torch.float16, device="meta"),
        [[0.0] * HIDDEN],
    ],
)
def test_bad_tokens_change_nothing(bad):
    cache = MMTokenCache(HIDDEN, 4, 2)
    with pytest.raises(InvalidArgument):
        cache.put(key("x"), bad)
    assert len(cache) == 0 and cache.num_free_blocks == 2


def test_release_of_an_unheld_key_is_an_error():
    cache = MMTokenCache(HIDDEN, 4, 2)
    cache.put(key("a"), tokens(2))
    with pytest.raises(InvalidArgument, match="not held"):
        cache.release(key("a"))


@pytest.mark.parametrize("kwargs", [{"hidden_size": 0}, {"block_size": -1}, {"dtype": torch.int8}])
def test_bad_construction(kwargs):
    args = {"hidden_size": HIDDEN, "block_size": 4, "num_blocks": 2, **kwargs}
    with pytest.raises(InvalidArgument):
        MMTokenCache(**args)


def test_reserve_commit_is_the_receive_path():
    cache = MMTokenCache(HIDDEN, 4, 4)
    entry = cache.reserve(key("r"), 6)
    assert key("r") not in cache and cache.get(key("r")) is None  # invisible until commit
    for i, block in enumerate(entry.blocks):  # what a peer's transfer does
        part = tokens(6)[4 * i : 4 * i + 4]
        cache.storage[block, : len(part)] = part
    cache.commit(key("r"))
    assert torch.equal(cache.get(key("r")), tokens(6))
    assert cache.hold_count(key("r")) == 2  # the reserver's hold and get's
    with pytest.raises(InvalidArgument, match="already"):
        cache.reserve(key("r"), 6)


def test_abort_gives_blocks_back_and_leaves_nothing_findable():
    cache = MMTokenCache(HIDDEN, 4, 2)
    cache.reserve(key("r"), 8)
    with pytest.raises(PoolExhausted):
        cache.put(key("x"), tokens(1))
    cache.abort(key("r"))
    assert cache.num_free_blocks == 2 and cache.hold_count(key("r")) == 0
    hits = cache.pool.hits
    cache.put(key("r"), tokens(8, seed=3))  # must not reuse the never-written blocks
    assert cache.pool.hits == hits
    assert torch.equal(cache.get(key("r")), tokens(8, seed=3))
    with pytest.raises(InvalidArgument, match="not reserved"):
        cache.abort(key("r"))
