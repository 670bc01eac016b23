# SPDX-License-Identifier: Apache-2.0
"""Multimodal-token cache: encoder outputs in pages, addressed by the image's content key."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from epdrt._core import BlockPool
from epdrt.cache._checks import cache_dtype, positive_int, tensor_arg
from epdrt.device import Device
from epdrt.errors import InvalidArgument, PoolExhausted
from epdrt.region import Region

ContentKey = bytes | int

#: Longest bytes key: the pool's 64-byte keys minus a type tag and a 4-byte block index.
MAX_KEY_BYTES = 59


@dataclass(frozen=True)
class MMEntry:
    """Where one image's tokens live: ``blocks`` in token order, ``num_tokens`` rows in all."""

    key: ContentKey
    blocks: tuple[int, ...]
    num_tokens: int


def _key_prefix(key: object) -> bytes:
    if isinstance(key, bool) or not isinstance(key, (bytes, int)):
        raise TypeError(f"a content key must be bytes or int, not {type(key).__name__}")
    if isinstance(key, int):
        if not -(2**63) <= key < 2**64:
            raise InvalidArgument("an int content key must fit in 64 bits")
        return b"i" + (key % 2**64).to_bytes(8, "little")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise InvalidArgument(
            f"a bytes content key must have 1 to {MAX_KEY_BYTES} bytes, got {len(key)}"
        )
    return b"b" + key


class MMTokenCache:
    """Encoder outputs ``[num_tokens, hidden_size]`` in blocks of ``block_size`` rows.

    Layout: ``storage`` is ``[num_blocks, block_size, hidden_size]`` in one region. An entry (one
    image) spans ``ceil(num_tokens / block_size)`` blocks, not necessarily adjacent. Block ``i``
    of an entry is committed to the pool under (key, i), so blocks are content-addressed: a
    ``put`` of a key whose blocks are still cached reuses them instead of copying again.

    Holding: ``get``/``lookup`` (and ``put(..., hold=True)``) take one reference on the entry;
    ``release`` drops it. Entries nobody holds stay cached and are evicted oldest first when
    space is needed. Not thread-safe: one owner thread per cache.
    """

    def __init__(
        self,
        hidden_size: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype = torch.float16,
        device: str | int | torch.device | Device = "cpu",
        *,
        region: Region | None = None,
    ) -> None:
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.block_size = positive_int("block_size", block_size)
        self.num_blocks = positive_int("num_blocks", num_blocks)
        self.dtype = cache_dtype(dtype)
        shape = (num_blocks, block_size, hidden_size)
        itemsize = torch.empty((), dtype=dtype).element_size()
        #: bytes of one block
        self.block_nbytes = block_size * hidden_size * itemsize
        nbytes = num_blocks * self.block_nbytes
        if region is None:
            region = Region.create(nbytes, device)
        elif region.nbytes < nbytes:
            raise InvalidArgument(f"the region has {region.nbytes} bytes; the cache needs {nbytes}")
        self.region = region
        self.device = region.opened_on.torch  # where this process computes on it
        #: [num_blocks, block_size, hidden_size]
        self.storage = region.tensor(dtype, shape)
        self.pool = BlockPool(num_blocks)
        self._entries: dict[ContentKey, MMEntry] = {}
        self._block_owner: dict[int, ContentKey] = {}
        self._holds: dict[ContentKey, int] = {}
        # reserved entries (held, not yet visible) and the indices of their unwritten blocks
        self._pending: dict[ContentKey, tuple[MMEntry, list[int]]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- queries ---------------------------------------------------------------------------
    def __contains__(self, key: ContentKey) -> bool:
        _key_prefix(key)
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by anyone (free or cached-but-evictable)."""
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def peek(self, key: ContentKey) -> MMEntry:
        """The cached entry for ``key`` without taking a hold (KeyError if not cached)."""
        return self._entries[key]

    def hold_count(self, key: ContentKey) -> int:
        return self._holds.get(key, 0)

    # ---- put / get / release ---------------------------------------------------------------
    def put(self, key: ContentKey, tokens: torch.Tensor, *, hold: bool = False) -> MMEntry:
        """Caches ``tokens [num_tokens, hidden_size]`` under ``key`` (a no-op if already cached).

        Raises PoolExhausted (back-pressure; nothing changes) when held entries leave too little
        room, and InvalidArgument when one entry is larger than the whole cache.
        """
        _key_prefix(key)
        tensor_arg("tokens", tokens, (None, self.hidden_size), self.dtype, self.device)
        num_tokens = tokens.shape[0]
        self._check_fits(num_tokens)
        if key in self._entries:
            entry = self._entries[key]
            if entry.num_tokens != num_tokens:
                raise InvalidArgument(
                    f"key already caches {entry.num_tokens} tokens, not {num_tokens}: keys must"
                    " be content hashes"
                )
            return self._acquire(entry) if hold else entry
        entry, new_blocks = self._place(key, num_tokens, tokens)
        self._commit_keys(entry, new_blocks)
        if not hold:
            self.release(key)
        return entry

    def reserve(self, key: ContentKey, num_tokens: int) -> MMEntry:
        """Holds blocks for ``num_tokens`` rows of ``key`` that a peer will write (receive path).

        The entry is held and not yet visible to ``lookup``/``get``: call ``commit(key)`` once
        its rows are written, or ``abort(key)`` to give the blocks back. Blocks of ``key`` that
        are still cached are reused (their rows are already right; writing them again is
        harmless). Raises PoolExhausted (nothing changes) or InvalidArgument like ``put``.
        """
        _key_prefix(key)
        if key in self._entries or key in self._pending:
            raise InvalidArgument(f"{key!r} is already cached or reserved")
        self._check_fits(num_tokens)
        entry, new_blocks = self._place(key, num_tokens, None)
        del self._entries[key]
        self._pending[key] = (entry, new_blocks)
        return entry

    def reserved(self, key: ContentKey) -> MMEntry:
        """The entry ``reserve(key)`` made, not yet committed (KeyError if there is none)."""
        return self._pending[key][0]

    def commit(self, key: ContentKey) -> MMEntry:
        """Makes a reserved entry visible; it stays held by the reserver until ``release``."""
        pending = self._pending.pop(key, None)
        if pending is None:
            raise InvalidArgument(f"{key!r} is not reserved")
        entry, new_blocks = pending
        self._commit_keys(entry, new_blocks)
        self._entries[key] = entry
        return entry

    def abort(self, key: ContentKey) -> None:
        """Gives back a reservation whose rows never arrived; its blocks lose their keys."""
        pending = self._pending.pop(key, None)
        if pending is None:
            raise InvalidArgument(f"{key!r} is not reserved")
        entry, _ = pending
        del self._holds[key]
        for block in entry.blocks:
            del self._block_owner[block]
        self.pool.free(entry.blocks)  # never-written blocks carry no key: nothing can find them

    # ---- internals -------------------------------------------------------------------------
    def _check_fits(self, num_tokens: int) -> int:
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
            raise InvalidArgument(f"an entry needs a positive number of tokens, got {num_tokens!r}")
        num_blocks = self.blocks_for(num_tokens)
        if num_blocks > self.num_blocks:
            raise InvalidArgument(
                f"an entry of {num_tokens} tokens needs {num_blocks} blocks of {self.block_size};"
                f" the whole cache has {self.num_blocks}"
            )
        return num_blocks

    def _place(
        self, key: ContentKey, num_tokens: int, tokens: torch.Tensor | None
    ) -> tuple[MMEntry, list[int]]:
        """Finds or allocates the blocks of a new entry, writes ``tokens`` (if given) into the
        newly allocated ones and registers the entry held once. Returns the entry and the
        indices of its new blocks, whose content keys ``_commit_keys`` records once their rows
        are written. All or nothing (PoolExhausted)."""
        prefix = _key_prefix(key)
        block_keys = [prefix + i.to_bytes(4, "little") for i in range(self.blocks_for(num_tokens))]
        # Blocks of an evicted entry with the same key may still be cached: reuse them.
        found = self.pool.lookup_many(block_keys)
        missing = [i for i, b in enumerate(found) if b is None]
        try:
            new_blocks = self.pool.allocate(len(missing))
        except PoolExhausted as exc:
            self.pool.free([b for b in found if b is not None])
            raise PoolExhausted(
                f"MM-token cache full: {num_tokens} tokens need {len(missing)} more blocks,"
                f" {self.pool.num_free} of {self.num_blocks} are free (the rest are held)"
            ) from exc
        self._drop_evicted(new_blocks)
        for i, block in zip(missing, new_blocks):
            found[i] = block
            if tokens is not None:
                rows = tokens[i * self.block_size : (i + 1) * self.block_size]
                self.storage[block, : rows.shape[0]] = rows
        entry = MMEntry(key, tuple(found), num_tokens)  # type: ignore[arg-type]
        self._entries[key] = entry
        for block in entry.blocks:
            self._block_owner[block] = key
        self._holds[key] = self._holds.get(key, 0) + 1
        return entry, missing

    def _commit_keys(self, entry: MMEntry, new_blocks: list[int]) -> None:
        prefix = _key_prefix(entry.key)
        ids = [entry.blocks[i] for i in new_blocks]
        self.pool.commit_many(ids, [prefix + i.to_bytes(4, "little") for i in new_blocks])

    def lookup(self, key: ContentKey) -> MMEntry | None:
        """The entry for ``key``, held (call ``release``), or None on a miss."""
        _key_prefix(key)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return self._acquire(entry)

    def get(self, key: ContentKey) -> torch.Tensor | None:
        """A copy of ``key``'s tokens ``[num_tokens, hidden_size]``, held; None on a miss."""
        entry = self.lookup(key)
        return None if entry is None else self.tokens(entry)

    def tokens(self, entry: MMEntry) -> torch.Tensor:
        """Gathers an entry's rows into a new ``[num_tokens, hidden_size]`` tensor."""
        blocks = torch.tensor(entry.blocks, dtype=torch.int64, device=self.device)
        return self.storage[blocks].reshape(-1, self.hidden_size)[: entry.num_tokens].clone()

    def release(self, key: ContentKey) -> None:
        """Drops one hold on ``key``; raises InvalidArgument if ``key`` is not held."""
        _key_prefix(key)
        held = self._holds.get(key, 0)
        if held == 0:
            raise InvalidArgument(f"cannot release {key!r}: it is not held")
        if held == 1:
            del self._holds[key]
        else:
            self._holds[key] = held - 1
        self.pool.free(self._entries[key].blocks)

    def _acquire(self, entry: MMEntry) -> MMEntry:
        prefix = _key_prefix(entry.key)
        for i, block in enumerate(entry.blocks):
            # Invariant: a cached entry's blocks all still hold their keys (see _drop_evicted).
            got = self.pool.lookup(prefix + i.to_bytes(4, "little"))
            if got != block:
                raise RuntimeError(
                    f"MM cache out of sync with its pool: block {i} of {entry.key!r}"
                )
        self._holds[entry.key] = self._holds.get(entry.key, 0) + 1
        return entry

    def _drop_evicted(self, reused_blocks: list[int]) -> None:
        """Forgets every entry that lost a block to ``allocate`` (its key was evicted)."""
        for block in reused_blocks:
            key = self._block_owner.get(block)
            if key is None:
                continue
            for b in self._entries.pop(key).blocks:
                del self._block_owner[b]
            self.evictions += 1

    def __repr__(self) -> str:
        return (
            f"MMTokenCache(hidden={self.hidden_size}, block_size={self.block_size},"
            f" blocks={self.num_blocks}, entries={len(self)}, free={self.num_free_blocks},"
            f" dtype={self.dtype}, device={self.device})"
        )
