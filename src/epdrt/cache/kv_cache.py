# SPDX-License-Identifier: Apache-2.0
"""Paged KV cache: every layer's K and V for fixed-size token blocks, in one region."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator

import torch

from epdrt._core import BlockPool
from epdrt.cache._checks import cache_dtype, positive_int, tensor_arg
from epdrt.device import Device
from epdrt.errors import InvalidArgument, PoolExhausted
from epdrt.kernels import kv_gather, kv_scatter
from epdrt.region import Region


class PagedKVCache:
    """K/V of many sequences in ``num_blocks`` blocks of ``block_size`` tokens.

    Layout: ``storage`` is ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``
    (2 = K, V), in one region. A token's cache slot is ``block * block_size + offset``.

    NOTE: blocks are the outer dimension so one block holds every layer of its tokens: a
    sequence's whole KV leaves in ``len(block_table)`` copies of ``block_nbytes`` (fewer when ids
    are consecutive), and one layer, ``storage[:, layer]``, leaves as one contiguous
    ``layer_nbytes`` chunk per block, so layer-by-layer sending can overlap prefill compute.

    Sequences are keyed by any hashable id. Not thread-safe: one owner thread per cache.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype = torch.float16,
        device: str | int | torch.device | Device = "cpu",
        *,
        region: Region | None = None,
    ) -> None:
        """Creates the cache in a new region, or over ``region`` (e.g. opened from a peer)."""
        self.num_layers = positive_int("num_layers", num_layers)
        self.num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.block_size = positive_int("block_size", block_size)
        self.num_blocks = positive_int("num_blocks", num_blocks)
        self.dtype = cache_dtype(dtype)
        shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        itemsize = torch.empty((), dtype=dtype).element_size()
        #: bytes of one layer's K and V in one block
        self.layer_nbytes = 2 * block_size * num_kv_heads * head_dim * itemsize
        #: bytes of one block (all layers)
        self.block_nbytes = num_layers * self.layer_nbytes
        nbytes = math.prod(shape) * itemsize
        if region is None:
            region = Region.create(nbytes, device)
        elif region.nbytes < nbytes:
            raise InvalidArgument(f"the region has {region.nbytes} bytes; the cache needs {nbytes}")
        self.region = region
        self.device = region.opened_on.torch  # where this process computes on it
        #: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.storage = region.tensor(dtype, shape)
        self.pool = BlockPool(num_blocks)
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # ---- sequences -------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    def sequences(self) -> Iterator[Hashable]:
        return iter(self._tables)

    def seq_len(self, seq_id: Hashable) -> int:
        """Number of tokens stored for ``seq_id``."""
        return self._lengths[self._known(seq_id)]

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Block ids of ``seq_id`` in token order (a copy)."""
        return list(self._tables[self._known(seq_id)])

    def num_blocks_of(self, seq_id: Hashable) -> int:
        """Number of blocks ``seq_id`` holds."""
        return len(self._tables[self._known(seq_id)])

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
        """Blocks that ``reserve(seq_id, num_new_tokens)`` would allocate."""
        length = self._lengths.get(seq_id, 0)
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-(length + num_new_tokens) // self.block_size) - have)

    def extend(self, seq_id: Hashable, num_new_tokens: int) -> int:
        """Makes room for ``num_new_tokens`` more tokens of ``seq_id`` (created if new),
        allocating blocks as needed; returns the sequence's new length.

        All or nothing: raises PoolExhausted, changing nothing, when too few blocks are free.
        The runtime's per-step call (no tensor is made; ``FlatBatch`` computes the slots).
        """
        if not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise InvalidArgument(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
        need = self.blocks_needed(seq_id, num_new_tokens)
        try:
            new_blocks = self.pool.allocate(need) if need else ()
        except PoolExhausted as exc:
            raise PoolExhausted(
                f"KV cache full: sequence {seq_id!r} needs {need} more blocks of"
                f" {self.block_size} tokens, {self.pool.num_free} of {self.num_blocks} are free"
            ) from exc
        self._tables.setdefault(seq_id, []).extend(new_blocks)
        length = self._lengths.get(seq_id, 0) + num_new_tokens
        self._lengths[seq_id] = length
        return length

    def reserve(self, seq_id: Hashable, num_new_tokens: int) -> torch.Tensor:
        """``extend``, returning the new tokens' slots: ``[num_new_tokens] int64`` on the
        cache's device."""
        start = self.extend(seq_id, num_new_tokens) - num_new_tokens
        table = self._tables[seq_id]
        positions = torch.arange(start, start + num_new_tokens)
        blocks = torch.tensor(table, dtype=torch.int64)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def free(self, seq_id: Hashable) -> None:
        """Releases every block of ``seq_id``; the last block goes to the free queue first."""
        table = self._tables.pop(self._known(seq_id))
        del self._lengths[seq_id]
        self.pool.free(table[::-1])

    # ---- data ------------------------------------------------------------------------------
    def layer(self, layer: int) -> torch.Tensor:
        """View ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` of one layer (strided)."""
        self._check_layer(layer)
        return self.storage[:, layer]

    def write(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Stores one layer's ``key``/``value`` ``[n, num_kv_heads, head_dim]`` at ``slots [n]``
        (int64 or int32)."""
        self._check_layer(layer)
        n = self._check_slots(slots)
        shape = (n, self.num_kv_heads, self.head_dim)
        tensor_arg("key", key, shape, self.dtype, self.device)
        tensor_arg("value", value, shape, self.dtype, self.device)
        # Slots were checked above; the kernel needs packed [H, D] rows.
        kv_scatter(
            key.contiguous(), value.contiguous(), self.layer(layer), slots, check_indices=False
        )

    def append(self, seq_id: Hashable, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Appends ``key``/``value`` ``[num_layers, n, num_kv_heads, head_dim]`` to ``seq_id``.

        Checks everything before reserving, so a bad argument changes nothing. Returns the slots.
        """
        shape = (self.num_layers, None, self.num_kv_heads, self.head_dim)
        tensor_arg("key", key, shape, self.dtype, self.device)
        tensor_arg(
            "value", value, (self.num_layers, key.shape[1], *shape[2:]), self.dtype, self.device
        )
        slots = self.reserve(seq_id, key.shape[1])
        for layer in range(self.num_layers):
            self.write(layer, slots, key[layer], value[layer])
        return slots

    def read(self, seq_id: Hashable, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies ``seq_id``'s K and V out.

        Returns ``[seq_len, H, D]`` each for one ``layer``, else ``[L, seq_len, H, D]``.
        """
        table = torch.tensor(
            self._tables[self._known(seq_id)], dtype=torch.int64, device=self.device
        )
        length = self._lengths[seq_id]
        if layer is None:
            return kv_gather(self.storage, table[None], [length], check_indices=False)
        self._check_layer(layer)
        return kv_gather(self.layer(layer), table[None], [length], check_indices=False)

    # ---- checks ----------------------------------------------------------------------------
    def _known(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq_id

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer must be in [0, {self.num_layers}), got {layer!r}")

    def _check_slots(self, slots: torch.Tensor) -> int:
        dtype = (
            torch.int32
            if isinstance(slots, torch.Tensor) and slots.dtype == torch.int32
            else torch.int64
        )
        tensor_arg("slots", slots, (None,), dtype, self.device)  # int64, or int32 (FlatBatch's)
        n = slots.shape[0]
        if n and (int(slots.min()) < 0 or int(slots.max()) >= self.num_blocks * self.block_size):
            raise InvalidArgument(
                f"slots must be in [0, {self.num_blocks * self.block_size}), got"
                f" [{int(slots.min())}, {int(slots.max())}]"
            )
        return n

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads},"
            f" head_dim={self.head_dim}, block_size={self.block_size}, blocks={self.num_blocks},"
            f" free={self.num_free_blocks}, dtype={self.dtype}, device={self.device})"
        )
