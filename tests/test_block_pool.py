# SPDX-License-Identifier: Apache-2.0
"""BlockPool: exact ids and queue order, errors that change nothing, and a hypothesis state
machine against the pure-Python model (epdrt.testing.model_pool)."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from epdrt import BlockPool, EpdrtError, InvalidArgument, PoolExhausted
from epdrt.testing.model_pool import ModelBlockPool

POOL_CLASSES = [BlockPool, ModelBlockPool]


@pytest.fixture(params=POOL_CLASSES, ids=["cpp", "model"])
def pool_cls(request):
    return request.param


@pytest.mark.parametrize("num_blocks", [1, 7, 4096])
def test_allocate_takes_oldest_free_first(pool_cls, num_blocks):
    pool = pool_cls(num_blocks)
    ids = pool.allocate(num_blocks)
    assert ids == list(range(num_blocks))
    assert pool.num_free == 0
    pool.free(ids[::-1])
    assert pool.free_queue() == ids[::-1]
    assert pool.allocate(1) == [num_blocks - 1]


def test_exhaustion_changes_nothing(pool_cls):
    pool = pool_cls(4)
    pool.allocate(3)
    with pytest.raises(PoolExhausted):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(1) == [3]


def test_pool_exhausted_is_an_epdrt_error():
    assert issubclass(PoolExhausted, EpdrtError)
    assert issubclass(InvalidArgument, ValueError)


@pytest.mark.parametrize("bad", [[-1], [4], [0, 0], [1]])
def test_bad_free_raises_value_error_and_changes_nothing(pool_cls, bad):
    pool = pool_cls(4)
    pool.allocate(1)  # block 0 held once; 1..3 free
    before = (pool.free_queue(), [pool.ref_count(i) for i in range(4)])
    with pytest.raises(ValueError):
        pool.free(bad)
    assert (pool.free_queue(), [pool.ref_count(i) for i in range(4)]) == before


def test_free_with_valid_prefix_rolls_back(pool_cls):
    pool = pool_cls(4)
    ids = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([ids[0], ids[1], 3])
    assert [pool.ref_count(i) for i in ids] == [1, 1]


def test_incref_and_repeated_free(pool_cls):
    pool = pool_cls(2)
    (b,) = pool.allocate(1)
    pool.incref([b, b])
    assert pool.ref_count(b) == 3
    pool.free([b, b])
    assert pool.ref_count(b) == 1 and pool.num_free == 1
    pool.free([b])
    assert pool.free_queue() == [1, b]
    with pytest.raises(ValueError):
        pool.incref([b])


@pytest.mark.parametrize(
    "key", [7, -1, 2**64 - 1, b"\x07", bytes(range(13)), bytes(range(32)), b"x" * 64]
)
def test_commit_and_lookup_revive_a_free_block(pool_cls, key):
    pool = pool_cls(3)
    a, b = pool.allocate(2)
    assert pool.commit(b, key)
    pool.free([a, b])
    assert pool.num_cached == 1
    assert pool.lookup(key) == b
    assert pool.ref_count(b) == 1
    assert pool.free_queue() == [2, a]
    assert (pool.hits, pool.misses, pool.num_cached) == (1, 0, 0)


def _structured_keys(kind: str) -> list[int | bytes]:
    """Keys that differ in few bits, in the places a weak hash would lose them: ints spaced
    by powers of two (low, middle and top bits), 64-byte keys that differ in one byte each."""
    if kind == "int strides":
        return [i << shift for shift in (0, 13, 32, 51) for i in range(1, 256)]
    if kind == "int top bits":
        return [i << 56 for i in range(256)]
    return [bytes(pos) + bytes([value]) + bytes(63 - pos) for pos in range(64) for value in (1, 2)]


@pytest.mark.parametrize("kind", ["int strides", "int top bits", "bytes one byte apart"])
def test_structured_keys_are_all_found_and_their_neighbours_missed(kind):
    keys = list(dict.fromkeys(_structured_keys(kind)))
    pool = BlockPool(len(keys) + 1)
    ids = pool.allocate(len(keys))
    assert pool.commit_many(ids, keys) == [True] * len(keys)
    pool.free(ids)
    assert pool.lookup_many(keys) == ids
    assert [pool.lookup(k) for k in keys] == ids
    if kind == "bytes one byte apart":
        neighbours = [k[:-1] + b"\x01" for k in keys[:-2]] + [bytes(64)]
    else:
        neighbours = [k + 1 for k in keys if k + 1 not in set(keys)]
    assert pool.lookup_many(neighbours) == [None] * len(neighbours)
    assert pool.misses == len(neighbours)


def test_int_and_bytes_keys_are_distinct():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    assert pool.commit(a, 1)
    assert pool.commit(b, b"\x01")
    assert pool.commit(c, (1).to_bytes(8, "little"))  # the int's own bytes: still another key
    assert pool.lookup(1) == a and pool.lookup(b"\x01") == b
    assert pool.lookup((1).to_bytes(8, "little")) == c
    assert pool.lookup(-1) is None and pool.lookup(2**64 - 1) is None  # a's key is 1 only


def test_allocate_evicts_keys_oldest_first(pool_cls):
    pool = pool_cls(2)
    a, b = pool.allocate(2)
    pool.commit(a, b"a")
    pool.commit(b, b"b")
    pool.free([a, b])
    assert pool.allocate(1) == [a]
    assert pool.evictions == 1
    assert pool.lookup(b"a") is None and pool.lookup(b"b") == b
    assert (pool.hits, pool.misses) == (1, 1)


def test_commit_of_a_held_key_keeps_the_first_block(pool_cls):
    pool = pool_cls(3)
    a, b, c = pool.allocate(3)
    assert pool.commit(a, b"k")
    assert not pool.commit(b, b"k")
    assert pool.commit(a, b"k")  # idempotent
    assert pool.commit(a, b"other")  # a gives up b"k"
    assert pool.commit(c, b"k")
    assert pool.lookup(b"k") == c


def test_commit_many_checks_all_ids_first(pool_cls):
    pool = pool_cls(3)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.commit_many([a, 2], [b"x", b"y"])
    assert pool.lookup(b"x") is None
    assert pool.commit_many([a, b], [b"x", b"x"]) == [True, False]
    assert pool.lookup_many([b"x", b"y"]) == [a, None]


@pytest.mark.parametrize("key", [1.5, "str", None, (1, 2), True])
def test_wrong_key_type_raises_type_error(key):
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    with pytest.raises(TypeError):
        pool.commit(a, key)
    with pytest.raises(TypeError):
        pool.lookup(key)


@pytest.mark.parametrize("key", [b"", b"x" * 65, 2**64, -(2**63) - 1])
def test_out_of_range_keys_raise_value_error(key):
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    with pytest.raises(ValueError):
        pool.commit(a, key)


@pytest.mark.parametrize("n", [0, -1])
def test_constructor_rejects_non_positive_sizes(pool_cls, n):
    with pytest.raises(ValueError):
        pool_cls(n)


def test_negative_allocate_raises(pool_cls):
    with pytest.raises(ValueError):
        pool_cls(2).allocate(-1)


KEYS = st.one_of(st.integers(0, 5), st.binary(min_size=1, max_size=2))


class PoolMachine(RuleBasedStateMachine):
    """Random operation sequences on both pools; every result and counter must agree."""

    NUM_BLOCKS = 8

    def __init__(self) -> None:
        super().__init__()
        self.cpp = BlockPool(self.NUM_BLOCKS)
        self.model = ModelBlockPool(self.NUM_BLOCKS)
        self.held: list[int] = []  # one entry per reference the test owns

    def _both(self, op, *args):
        outcomes = []
        for pool in (self.cpp, self.model):
            try:
                outcomes.append(("ok", getattr(pool, op)(*args)))
            except (PoolExhausted, ValueError) as exc:
                outcomes.append(("error", type(exc).__name__))
        assert outcomes[0] == outcomes[1], (op, args, outcomes)
        return outcomes[0]

    @rule(n=st.integers(0, 10))
    def allocate(self, n):
        kind, result = self._both("allocate", n)
        if kind == "ok":
            self.held.extend(result)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_some(self, data):
        picks = data.draw(st.lists(st.sampled_from(self.held), max_size=4))
        kind, _ = self._both("free", picks)
        if kind == "ok":
            for b in picks:
                self.held.remove(b)

    @rule(ids=st.lists(st.integers(-1, NUM_BLOCKS), max_size=3))
    def free_arbitrary(self, ids):
        kind, _ = self._both("free", ids)
        if kind == "ok":
            for b in ids:
                self.held.remove(b)

    @rule(ids=st.lists(st.integers(-1, NUM_BLOCKS), max_size=3))
    def incref(self, ids):
        kind, _ = self._both("incref", ids)
        if kind == "ok":
            self.held.extend(ids)

    @rule(block=st.integers(0, NUM_BLOCKS - 1), key=KEYS)
    def commit(self, block, key):
        self._both("commit", block, key)

    @rule(key=KEYS)
    def lookup(self, key):
        _kind, result = self._both("lookup", key)
        if result is not None:
            self.held.append(result)

    @invariant()
    def same_state(self):
        assert self.cpp.free_queue() == self.model.free_queue()
        for attr in ("num_free", "num_used", "num_cached", "hits", "misses", "evictions"):
            assert getattr(self.cpp, attr) == getattr(self.model, attr), attr
        refs = [self.cpp.ref_count(i) for i in range(self.NUM_BLOCKS)]
        assert refs == [self.model.ref_count(i) for i in range(self.NUM_BLOCKS)]
        assert all(r >= 0 for r in refs)
        assert self.cpp.num_free + self.cpp.num_used == self.NUM_BLOCKS
        # No id owned twice: references held by the test match the pool's counts exactly.
        assert sorted(self.held) == sorted(i for i, r in enumerate(refs) for _ in range(r))
        assert len(set(self.cpp.free_queue())) == self.cpp.num_free


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
