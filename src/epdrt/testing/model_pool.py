# SPDX-License-Identifier: Apache-2.0
"""A pure-Python block pool with the exact semantics of epdrt.BlockPool.

The spec the C++ pool is tested against (hypothesis state machine) and the peer its benchmark
is measured against.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from epdrt.errors import InvalidArgument, PoolExhausted


class ModelBlockPool:
    """Reference block pool: refcounts, LRU free queue (OrderedDict), content-key index."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise InvalidArgument(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free_q: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.key_of: dict[int, Hashable] = {}
        self.index: dict[Hashable, int] = {}
        self.hits = self.misses = self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_q)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_q)

    @property
    def num_cached(self) -> int:
        return sum(1 for b in self.free_q if b in self.key_of)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise InvalidArgument(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self.free_q):
            raise PoolExhausted(f"cannot allocate {n} blocks: {len(self.free_q)} are free")
        out = []
        for _ in range(n):
            block, _ = self.free_q.popitem(last=False)
            if block in self.key_of:
                del self.index[self.key_of.pop(block)]
                self.evictions += 1
            self.refs[block] = 1
            out.append(block)
        return out

    def _check_held(self, ids: Sequence[int], times: dict[int, int]) -> None:
        for i in ids:
            if not 0 <= i < self.num_blocks:
                raise InvalidArgument(f"block id {i} is out of range")
            if self.refs[i] < times[i]:
                raise InvalidArgument(f"cannot free block {i}: it is not allocated")

    def free(self, ids: Sequence[int]) -> None:
        times: dict[int, int] = {}
        for i in ids:
            times[i] = times.get(i, 0) + 1
        self._check_held(ids, times)
        for i in ids:
            self.refs[i] -= 1
        for i in ids:
            if self.refs[i] == 0 and i not in self.free_q:
                self.free_q[i] = None

    def incref(self, ids: Sequence[int]) -> None:
        self._check_held(ids, dict.fromkeys(ids, 1))
        for i in ids:
            self.refs[i] += 1

    def _check_used(self, block: int) -> None:
        if not 0 <= block < self.num_blocks or self.refs[block] == 0:
            raise InvalidArgument(f"cannot commit block {block}: it is not allocated")

    def commit(self, block: int, key: Hashable) -> bool:
        self._check_used(block)
        if key in self.index:
            return self.index[key] == block
        if block in self.key_of:
            del self.index[self.key_of[block]]
        self.key_of[block] = key
        self.index[key] = block
        return True

    def lookup(self, key: Hashable) -> int | None:
        block = self.index.get(key)
        if block is None:
            self.misses += 1
            return None
        if self.refs[block] == 0:
            del self.free_q[block]
        self.refs[block] += 1
        self.hits += 1
        return block

    def lookup_many(self, keys: Sequence[Hashable]) -> list[int | None]:
        return [self.lookup(k) for k in keys]

    def commit_many(self, ids: Sequence[int], keys: Sequence[Hashable]) -> list[bool]:
        if len(ids) != len(keys):
            raise InvalidArgument("commit_many needs one key per id")
        for block in ids:
            self._check_used(block)
        return [self.commit(b, k) for b, k in zip(ids, keys)]

    def ref_count(self, block: int) -> int:
        return self.refs[block]

    def free_queue(self) -> list[int]:
        return list(self.free_q)
