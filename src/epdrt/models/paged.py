# SPDX-License-Identifier: Apache-2.0
"""Paged execution of a ``transformers`` language model: flat ragged batches over a
``PagedKVCache``.

A step's tokens (whole prompts, prompt chunks, one token per decoding sequence, mixed) are
concatenated into one ``[1, T, hidden]`` batch with no padding. ``FlatBatch`` holds where each
token's K/V goes (``slot_mapping``) and what each sequence attends to (block tables, context
lengths, query offsets), built on the host once per step and moved to the device in one copy.

The model's own modules (embeddings, rotary, MLPs, norms) run unchanged; only attention is
epdrt's: ``ATTENTION`` is registered with ``transformers.AttentionInterface``, and while
``paged_attention_of(config)`` is active the model's attention layers call it. It writes the
step's new K/V into the layer's pages (``kv_scatter``) and attends over the pages
(``paged_attention_decode`` / ``paged_attention_prefill``): no dense copy of any sequence's KV,
no mask tensor, no device-to-host read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedConfig

from epdrt.cache.kv_cache import PagedKVCache
from epdrt.errors import InvalidArgument
from epdrt.kernels import kv_scatter, paged_attention_decode, paged_attention_prefill

#: The ``attn_implementation`` name epdrt registers with ``transformers``.
ATTENTION = "epdrt_paged"
#: The keyword argument that carries the step's ``FlatBatch`` through the model to attention.
BATCH_KWARG = "epdrt_batch"


@dataclass(frozen=True, eq=False)
class FlatBatch:
    """One forward's tokens over a paged KV cache: ``b`` sequences, ``T`` new tokens in all.

    Sequence ``s``'s new tokens are rows ``cu_seqlens_q[s] .. cu_seqlens_q[s + 1]`` of the
    batch and positions ``starts[s] ..`` of the sequence; after the step the cache holds
    ``context_lens[s] = starts[s] + query_lens[s]`` of its tokens.

    Host fields (numpy int64) serve position ids and logits rows; device fields (on the
    cache's device) serve the kernels. Build with :meth:`build`.
    """

    cache: PagedKVCache
    seq_ids: tuple[Hashable, ...]
    #: ``[b]`` host: new tokens per sequence, and the position of the first one.
    query_lens: np.ndarray
    starts: np.ndarray
    #: ``[T]`` int32: the cache slot of each new token.
    slot_mapping: torch.Tensor
    #: ``[b, W]`` int32: each sequence's blocks (rows padded with 0).
    block_tables: torch.Tensor
    #: ``[b]`` int32 and ``[b + 1]`` int32.
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int
    max_context_len: int
    #: The attention kernels' backend: "auto", "triton" or "torch" (``epdrt.kernels``).
    backend: str = "auto"
    #: Called with each layer's index once the step's K/V of that layer are in the cache
    #: (enqueued on the current stream, on a GPU), before its attention runs: a layer-wise
    #: KV hand-off starts copying the layer there. Attach with ``dataclasses.replace``.
    on_layer_written: Callable[[int], None] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token (the paged decode kernel applies)."""
        return self.max_query_len == 1 and bool((self.query_lens == 1).all())

    @property
    def last_rows(self) -> np.ndarray:
        """``[b]`` host: the batch row of each sequence's last new token."""
        return np.cumsum(self.query_lens) - 1

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        seqs: Sequence[tuple[Hashable, int] | tuple[Hashable, int, int]],
        backend: str = "auto",
    ) -> FlatBatch:
        """The batch of ``(seq_id, num_new)`` or ``(seq_id, num_new, start)`` entries.

        A sequence's new tokens are positions ``start .. start + num_new`` (default: its last
        ``num_new`` tokens), already in ``cache`` (``PagedKVCache.extend``): a prompt made room
        for whole can be prefilled chunk by chunk. The step attends to the sequence's first
        ``start + num_new`` tokens.

        Raises:
            InvalidArgument: no sequence, a count below 1, tokens past the sequence's length
                in the cache, or an unknown sequence; all before anything reaches the device.
        """
        if not seqs:
            raise InvalidArgument("a flat batch needs at least one sequence")
        b = len(seqs)
        ids = tuple(e[0] for e in seqs)
        tables = [cache.block_table(s) for s in ids]
        held = np.fromiter((cache.seq_len(s) for s in ids), np.int64, b)
        q_lens = np.fromiter((e[1] for e in seqs), np.int64, b)
        starts = np.fromiter(
            (e[2] if len(e) > 2 else h - e[1] for e, h in zip(seqs, held.tolist())), np.int64, b
        )
        bad = (q_lens < 1) | (starts < 0) | (starts + q_lens > held)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidArgument(
                f"sequence {ids[i]!r}: {int(q_lens[i])} new tokens at position {int(starts[i])},"
                f" but the cache holds {int(held[i])} (extend it first; at least one new token"
                " per sequence)"
            )
        width = max(map(len, tables))
        table_rows = np.zeros((b, width), dtype=np.int32)
        for row, table in zip(table_rows, tables):
            row[: len(table)] = table
        bs = cache.block_size
        if bool((q_lens == 1).all()):  # decode: one token per sequence, at position start
            slots = table_rows[np.arange(b), starts // bs] * bs + starts % bs
        else:
            seq_of_row = np.repeat(np.arange(b), q_lens)
            first_row = np.cumsum(q_lens) - q_lens
            pos = np.arange(int(q_lens.sum())) - first_row[seq_of_row] + starts[seq_of_row]
            slots = table_rows[seq_of_row, pos // bs] * bs + pos % bs
        return cls._to_device(cache, ids, q_lens, starts, slots, table_rows, backend)

    @classmethod
    def from_host(
        cls,
        cache: PagedKVCache,
        seq_ids: tuple[Hashable, ...],
        query_lens: np.ndarray,
        starts: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
        backend: str = "auto",
    ) -> FlatBatch:
        """Checks host metadata against ``cache`` and moves it to the cache's device in one
        copy. Shapes: ``[b]``, ``[b]``, ``[T]``, ``[b, W]``, integers."""
        b = len(seq_ids)
        lens = starts + query_lens
        total = int(query_lens.sum())
        if query_lens.shape != (b,) or starts.shape != (b,) or block_tables.shape[:1] != (b,):
            raise InvalidArgument(
                f"{b} sequences, but query_lens {list(query_lens.shape)}, starts"
                f" {list(starts.shape)}, block_tables {list(block_tables.shape)}"
            )
        if slot_mapping.shape != (total,):
            raise InvalidArgument(
                f"slot_mapping has {slot_mapping.shape[0] if slot_mapping.ndim else 0} entries;"
                f" the batch has {total} new tokens"
            )
        bs, nb = cache.block_size, cache.num_blocks
        used = np.arange(block_tables.shape[1])[None, :] < -(-lens[:, None] // bs)
        if (lens > block_tables.shape[1] * bs).any() or (
            used & ((block_tables < 0) | (block_tables >= nb))
        ).any():
            raise InvalidArgument(
                f"a block table points outside the cache's [0, {nb}) blocks or is too short"
                f" for its sequence's {int(lens.max())} tokens"
            )
        if total and (slot_mapping.min() < 0 or slot_mapping.max() >= nb * bs):
            raise InvalidArgument(f"slot_mapping points outside the cache's {nb * bs} slots")
        return cls._to_device(
            cache, tuple(seq_ids), query_lens.astype(np.int64), starts.astype(np.int64),
            slot_mapping, block_tables, backend,
        )  # fmt: skip

    @classmethod
    def _to_device(
        cls,
        cache: PagedKVCache,
        seq_ids: tuple[Hashable, ...],
        query_lens: np.ndarray,
        starts: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
        backend: str,
    ) -> FlatBatch:
        """The batch over checked host metadata: one int32 host buffer, one copy."""
        b, width = block_tables.shape
        total = slot_mapping.shape[0]
        lens = starts + query_lens
        # [slots T | tables b*W | lens b | cu b+1]
        cut = np.cumsum([total, b * width, b])
        host = np.empty(int(cut[-1]) + b + 1, dtype=np.int32)
        host[: cut[0]] = slot_mapping
        host[cut[0] : cut[1]] = block_tables.reshape(-1)
        host[cut[1] : cut[2]] = lens
        host[cut[2]] = 0
        np.cumsum(query_lens, out=host[cut[2] + 1 :])
        dev = torch.from_numpy(host).to(cache.device, non_blocking=True)
        return cls(
            cache=cache,
            seq_ids=seq_ids,
            query_lens=query_lens,
            starts=starts,
            slot_mapping=dev[: cut[0]],
            block_tables=dev[cut[0] : cut[1]].view(b, width),
            context_lens=dev[cut[1] : cut[2]],
            cu_seqlens_q=dev[cut[2] :],
            max_query_len=int(query_lens.max()),
            max_context_len=int(lens.max()),
            backend=backend,
        )


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``transformers`` attention function over a ``FlatBatch`` (keyword ``epdrt_batch``).

    ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]`` (rotary applied) for the
    batch's new tokens; ``module.layer_idx`` picks the cache layer. Writes the new K/V into
    their slots, then attends. Returns ``([1, T, Hq, D], None)``.
    """
    batch: FlatBatch | None = kwargs.get(BATCH_KWARG)
    if batch is None:
        raise InvalidArgument(
            f"attn_implementation {ATTENTION!r} needs a FlatBatch passed as {BATCH_KWARG}="
        )
    if getattr(module, "sliding_window", None) or kwargs.get("sliding_window"):
        raise InvalidArgument("paged attention has no sliding window")
    if query.shape[0] != 1 or query.shape[2] != batch.num_tokens:
        raise InvalidArgument(
            f"a flat batch runs as [1, {batch.num_tokens}] tokens, got query {list(query.shape)}"
        )
    layer = batch.cache.layer(module.layer_idx)
    k = key[0].transpose(0, 1).to(layer.dtype).contiguous()  # [T, Hkv, D]
    v = value[0].transpose(0, 1).to(layer.dtype).contiguous()
    kv_scatter(k, v, layer, batch.slot_mapping, check_indices=False)
    if batch.on_layer_written is not None:
        batch.on_layer_written(module.layer_idx)
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    if batch.is_decode:
        out = paged_attention_decode(
            q, layer, batch.block_tables, batch.context_lens, scaling,
            backend=batch.backend, check_indices=False, max_context_len=batch.max_context_len,
        )  # fmt: skip
    else:
        out = paged_attention_prefill(
            q, layer, batch.block_tables, batch.cu_seqlens_q, batch.context_lens, scaling,
            backend=batch.backend, check_indices=False, max_query_len=batch.max_query_len,
        )  # fmt: skip
    return out[None], None


AttentionInterface.register(ATTENTION, paged_attention_forward)


@contextlib.contextmanager
def paged_attention_of(config: PreTrainedConfig) -> Iterator[None]:
    """Makes the attention layers built from ``config`` run ``paged_attention_forward`` for
    the duration (the model's other users, e.g. ``generate()``, keep their implementation)."""
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
