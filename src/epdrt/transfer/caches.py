# SPDX-License-Identifier: Apache-2.0
"""Cache-to-cache transfers: a sequence's KV pages or an image's MM-token pages to a peer.

The receiver reserves destination blocks in its own cache and tells the sender their ids (a
``Peer.notify``, or through the router); the sender writes its blocks straight into them and
the receiver gets a notice per part. KV can go layer by layer (``KVSender.send_layer``) so the
transfer of layer ``l`` overlaps the prefill compute of layer ``l + 1``.

Both caches of a pair must have the same layout (checked at the first send).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from epdrt.cache.kv_cache import PagedKVCache
from epdrt.cache.mm_cache import ContentKey, MMEntry, MMTokenCache, _key_prefix
from epdrt.errors import InvalidArgument, TransferError
from epdrt.transfer.agent import Peer, SendHandle, TransferAgent
from epdrt.transfer.messages import Notice

KV_REGION = "kv"
MM_REGION = "mm"


def kv_layout(cache: PagedKVCache) -> str:
    return (
        f"kv layers={cache.num_layers} kv_heads={cache.num_kv_heads} head_dim={cache.head_dim}"
        f" block_size={cache.block_size} dtype={cache.dtype}"
    )


def mm_layout(cache: MMTokenCache) -> str:
    return f"mm hidden={cache.hidden_size} block_size={cache.block_size} dtype={cache.dtype}"


def register_kv_cache(agent: TransferAgent, cache: PagedKVCache, name: str = KV_REGION) -> None:
    """Registers ``cache``'s region with the agent as a block region of ``block_nbytes``."""
    agent.register(name, cache.region, block_nbytes=cache.block_nbytes, layout=kv_layout(cache))


def register_mm_cache(agent: TransferAgent, cache: MMTokenCache, name: str = MM_REGION) -> None:
    agent.register(name, cache.region, block_nbytes=cache.block_nbytes, layout=mm_layout(cache))


def _count(data: bytes) -> int:
    if len(data) != 8:
        raise TransferError(f"a cache notice carries an 8-byte count, got {len(data)} bytes")
    return int.from_bytes(data, "little")


class KVSender:
    """Sends sequences of a prefill-side :class:`PagedKVCache` to one peer's cache."""

    def __init__(
        self, peer: Peer, cache: PagedKVCache, *, region: str = KV_REGION, remote: str = ""
    ) -> None:
        self.peer = peer
        self.cache = cache
        self.region = region
        self.remote = remote or region

    def send(
        self, seq_id: Hashable, dst_blocks: Sequence[int], *, key: str | None = None
    ) -> SendHandle:
        """Every layer of every block of ``seq_id`` into ``dst_blocks`` (one part)."""
        src = self._blocks(seq_id, dst_blocks)
        return self.peer.send_blocks(
            key or str(seq_id), self.region, src, self.remote, dst_blocks,
            data=self.cache.seq_len(seq_id).to_bytes(8, "little"),
        )  # fmt: skip

    def send_layer(
        self, seq_id: Hashable, layer: int, dst_blocks: Sequence[int], *, key: str | None = None
    ) -> SendHandle:
        """Layer ``layer`` of every block of ``seq_id``: part ``layer`` of ``num_layers``."""
        if not isinstance(layer, int) or not 0 <= layer < self.cache.num_layers:
            raise InvalidArgument(f"layer must be in [0, {self.cache.num_layers}), got {layer!r}")
        src = self._blocks(seq_id, dst_blocks)
        lb = self.cache.layer_nbytes
        return self.peer.send_blocks(
            key or str(seq_id), self.region, src, self.remote, dst_blocks,
            offset=layer * lb, nbytes=lb, part=layer, num_parts=self.cache.num_layers,
            data=self.cache.seq_len(seq_id).to_bytes(8, "little"),
        )  # fmt: skip

    def _blocks(self, seq_id: Hashable, dst_blocks: Sequence[int]) -> list[int]:
        src = self.cache.block_table(seq_id)
        if len(src) != len(dst_blocks):
            raise InvalidArgument(
                f"sequence {seq_id!r} has {len(src)} blocks; {len(dst_blocks)} destinations given"
            )
        return src


class KVReceiver:
    """Receives sequences into a decode-side :class:`PagedKVCache`."""

    def __init__(self, peer: Peer, cache: PagedKVCache, *, region: str = KV_REGION) -> None:
        self.peer = peer
        self.cache = cache
        self.region = region

    def reserve(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Reserves room for ``num_tokens`` tokens of a new sequence; returns its block ids
        (tell them to the sender). Raises PoolExhausted, changing nothing, when full."""
        if seq_id in self.cache:
            raise InvalidArgument(f"sequence {seq_id!r} already exists in the cache")
        self.cache.extend(seq_id, num_tokens)
        return self.cache.block_table(seq_id)

    def wait(
        self, seq_id: Hashable, *, key: str | None = None, timeout: float | None = None
    ) -> list[Notice]:
        """Waits until every part of ``seq_id`` has landed; returns the notices by part.

        Raises TransferError (sender gone, or notices that do not match the reservation) or
        TimeoutError; the reserved blocks stay reserved (``abort`` frees them).
        """
        key = key or str(seq_id)
        table = self.cache.block_table(seq_id)
        parts: dict[int, Notice] = {}
        num_parts = 1
        deadline = None if timeout is None else _Deadline(timeout)
        while len(parts) < num_parts:
            notice = self.peer.recv(key, None if deadline is None else deadline.left())
            if notice.region != self.region or list(notice.blocks) != table:
                raise TransferError(
                    f"KV notice for {key!r} names region {notice.region!r} blocks"
                    f" {list(notice.blocks)}; the reservation is {self.region!r} {table}"
                )
            if _count(notice.data) != self.cache.seq_len(seq_id):
                raise TransferError(
                    f"the sender has {_count(notice.data)} tokens of {key!r}; "
                    f"{self.cache.seq_len(seq_id)} were reserved"
                )
            num_parts = notice.num_parts
            parts[notice.part] = notice
        return [parts[p] for p in sorted(parts)]

    def abort(self, seq_id: Hashable) -> None:
        """Frees the blocks reserved for ``seq_id`` (after a failed transfer)."""
        if seq_id in self.cache:
            self.cache.free(seq_id)


class MMSender:
    """Sends cached images of an encoder-side :class:`MMTokenCache` to one peer."""

    def __init__(
        self, peer: Peer, cache: MMTokenCache, *, region: str = MM_REGION, remote: str = ""
    ) -> None:
        self.peer = peer
        self.cache = cache
        self.region = region
        self.remote = remote or region

    def send(
        self, content_key: ContentKey, dst_blocks: Sequence[int], *, key: str | None = None
    ) -> SendHandle:
        """The pages of ``content_key`` into ``dst_blocks``. The entry is held (safe from
        eviction) until the send finishes."""
        entry = self.cache.lookup(content_key)
        if entry is None:
            raise InvalidArgument(f"{content_key!r} is not in the MM-token cache")
        try:
            if len(entry.blocks) != len(dst_blocks):
                raise InvalidArgument(
                    f"{content_key!r} spans {len(entry.blocks)} blocks;"
                    f" {len(dst_blocks)} destinations given"
                )
            handle = self.peer.send_blocks(
                key or mm_key(content_key), self.region, list(entry.blocks), self.remote,
                dst_blocks, data=entry.num_tokens.to_bytes(8, "little"),
            )  # fmt: skip
        except BaseException:
            self.cache.release(content_key)
            raise
        handle.add_done_callback(lambda _: self.cache.release(content_key))
        return handle


class MMReceiver:
    """Receives images into a prefill-side :class:`MMTokenCache`.

    NOTE: MMTokenCache has no public "reserve blocks, fill them elsewhere, then publish" call
    yet, so this class performs the bookkeeping of ``MMTokenCache.put`` on received pages (it
    uses the cache's private tables). Move it into the cache when it grows such an API.
    """

    def __init__(self, peer: Peer, cache: MMTokenCache, *, region: str = MM_REGION) -> None:
        self.peer = peer
        self.cache = cache
        self.region = region
        self._reserved: dict[ContentKey, tuple[list[int], int]] = {}

    def reserve(self, content_key: ContentKey, num_tokens: int) -> list[int]:
        """Takes blocks for ``num_tokens`` rows of ``content_key``; returns their ids.

        Raises InvalidArgument when the key is already cached or reserved, PoolExhausted when
        too few blocks are free.
        """
        _key_prefix(content_key)
        if content_key in self.cache or content_key in self._reserved:
            raise InvalidArgument(f"{content_key!r} is already cached or being received")
        if num_tokens <= 0:
            raise InvalidArgument("num_tokens must be positive")
        need = math.ceil(num_tokens / self.cache.block_size)
        blocks = self.cache.pool.allocate(need)
        self.cache._drop_evicted(blocks)
        self._reserved[content_key] = (blocks, num_tokens)
        return list(blocks)

    def wait(
        self, content_key: ContentKey, *, key: str | None = None, timeout: float | None = None
    ) -> MMEntry:
        """Waits for the pages of ``content_key``; returns its entry, held (``release`` it)."""
        blocks, num_tokens = self._reserved[content_key]
        notice = self.peer.recv(key or mm_key(content_key), timeout)
        if notice.region != self.region or list(notice.blocks) != blocks:
            raise TransferError(
                f"MM notice names region {notice.region!r} blocks {list(notice.blocks)};"
                f" the reservation is {self.region!r} {blocks}"
            )
        if _count(notice.data) != num_tokens:
            raise TransferError(f"the sender has {_count(notice.data)} tokens, not {num_tokens}")
        del self._reserved[content_key]
        return self._publish(content_key, blocks, num_tokens)

    def abort(self, content_key: ContentKey) -> None:
        """Frees the blocks reserved for ``content_key``."""
        blocks, _ = self._reserved.pop(content_key)
        self.cache.pool.free(blocks)

    def _publish(self, content_key: ContentKey, blocks: list[int], num_tokens: int) -> MMEntry:
        cache = self.cache
        if content_key in cache:  # cached meanwhile by a local put: keep that copy
            cache.pool.free(blocks)
            entry = cache.lookup(content_key)
            assert entry is not None
            return entry
        prefix = _key_prefix(content_key)
        keys = [prefix + i.to_bytes(4, "little") for i in range(len(blocks))]
        committed = cache.pool.commit_many(blocks, keys)
        if not all(committed):
            # Stale cached blocks of an evicted entry still hold some keys: publish a plain
            # copy through put() instead.
            rows = cache.storage[torch.tensor(blocks, dtype=torch.int64, device=cache.device)]
            tokens = rows.reshape(-1, cache.hidden_size)[:num_tokens].clone()
            cache.pool.free(blocks)
            return cache.put(content_key, tokens, hold=True)
        entry = MMEntry(content_key, tuple(blocks), num_tokens)
        cache._entries[content_key] = entry
        for block in blocks:
            cache._block_owner[block] = content_key
        cache._holds[content_key] = cache._holds.get(content_key, 0) + 1
        return entry


def mm_key(content_key: ContentKey) -> str:
    """The notice key of an image: ``mm:`` + hex of the bytes key, or the int."""
    if isinstance(content_key, bytes):
        return "mm:" + content_key.hex()
    return f"mm:{content_key}"


class _Deadline:
    def __init__(self, seconds: float) -> None:
        import time

        self._time = time.monotonic
        self._end = self._time() + seconds

    def left(self) -> float:
        return max(0.0, self._end - self._time())
