# SPDX-License-Identifier: Apache-2.0
"""Multimodal embedding assembly: prefill ``inputs_embeds`` from text embeddings and
``MMTokenCache`` pages (dispatcher, checks, and the source-row map builder)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from epdrt.errors import InvalidArgument
from epdrt.kernels import reference as refs

from . import _common as c

if TYPE_CHECKING:
    from epdrt.cache.mm_cache import MMEntry, MMTokenCache

#: One image: (first row in the flat batch, its blocks in token order, its token count).
Placement = tuple[int, Sequence[int], int]


def mm_source_rows(
    num_tokens: int,
    placements: Sequence[Placement],
    block_size: int,
    *,
    num_blocks: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The row map ``mm_embed`` takes: ``[num_tokens] int64``, -1 for text rows.

    Image ``(start, blocks, count)`` fills rows ``[start, start + count)``; its token ``j``
    comes from page row ``blocks[j // block_size] * block_size + j % block_size``.

    Raises:
        InvalidArgument: rows out of ``[0, num_tokens)``, overlapping images, too few blocks for
            ``count``, or (with ``num_blocks``) block ids out of ``[0, num_blocks)``.
    """
    for name, v in (("num_tokens", num_tokens), ("block_size", block_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "num_tokens" else 1):
            raise InvalidArgument(f"{name} must be a non-negative int, got {v!r}")
    rows = torch.full((num_tokens,), -1, dtype=torch.int64)
    spans = []
    for i, p in enumerate(placements):
        if not (isinstance(p, (tuple, list)) and len(p) == 3):
            raise InvalidArgument(f"placement {i} must be (start, blocks, count), got {p!r}")
        start, blocks, count = p
        if not (isinstance(start, int) and isinstance(count, int) and count >= 0 and start >= 0):
            raise InvalidArgument(f"placement {i}: start and count must be ints >= 0, got {p!r}")
        if start + count > num_tokens:
            raise InvalidArgument(
                f"image {i} covers rows [{start}, {start + count}); the batch has {num_tokens}"
            )
        table = torch.as_tensor(list(blocks), dtype=torch.int64)
        if table.numel() * block_size < count:
            raise InvalidArgument(
                f"image {i} has {count} tokens but {table.numel()} blocks of {block_size}"
            )
        if num_blocks is not None and table.numel():
            c.in_range(f"image {i}'s blocks", table, 0, num_blocks)
        j = torch.arange(count)
        rows[start : start + count] = table[j // block_size] * block_size + j % block_size
        spans.append((start, start + count, i))
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise InvalidArgument(f"images {a} and {b} overlap at row {start}")
    return rows.to(device)


def mm_embed(
    text_embeds: torch.Tensor,
    mm_pages: torch.Tensor,
    src_rows: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: c.Backend = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Builds prefill ``inputs_embeds``: row ``t`` is page row ``src_rows[t]``, or text row ``t``.

    Args:
        text_embeds: ``[T, hidden]`` text-token embeddings of the flat batch (placeholder rows
            included); unit column stride.
        mm_pages: ``[num_blocks, bs, hidden]`` (``MMTokenCache.storage``), same dtype and device;
            ``[bs, hidden]`` packed.
        src_rows: ``[T]`` int64 or int32, contiguous: -1 keeps the text row, else
            ``block * bs + row`` (see ``mm_source_rows``).
        out: ``[T, hidden]`` to write (unit column stride, not overlapping ``text_embeds``),
            or ``text_embeds`` itself to overwrite only the multimodal rows in place; default a
            new tensor.
        backend: "auto" (Triton on CUDA, the torch reference on CPU), "triton" or "torch".
        check_indices: check ``src_rows`` in ``[-1, num_blocks * bs)`` (one device sync).

    Returns:
        ``out`` (or the new tensor).

    Raises:
        InvalidArgument: before any launch, for bad shapes, dtypes, devices, strides or rows.
    """
    text = c.tensor("text_embeds", text_embeds, 2)
    pages = c.tensor("mm_pages", mm_pages, 3, device=text.device)
    num_tokens, hidden = text.shape
    num_blocks, bs, _ = pages.shape
    c.shape_is("mm_pages", pages, (num_blocks, bs, hidden))
    c.same_dtype("mm_pages", pages, "text_embeds", text)
    c.inner_contiguous("text_embeds", text, 1)
    c.inner_contiguous("mm_pages", pages, 2)
    if text.element_size() not in (1, 2, 4, 8):
        raise InvalidArgument(f"unsupported dtype {text.dtype}")
    rows = c.tensor("src_rows", src_rows, 1, dtype=(torch.int64, torch.int32), device=text.device)
    c.shape_is("src_rows", rows, (num_tokens,))
    c.contiguous("src_rows", rows)
    if out is None:
        out = torch.empty_like(text, memory_format=torch.contiguous_format)
    else:
        c.tensor("out", out, 2, device=text.device)
        c.shape_is("out", out, (num_tokens, hidden))
        c.same_dtype("out", out, "text_embeds", text)
        c.inner_contiguous("out", out, 1)
    if check_indices:
        c.in_range("src_rows", rows, -1, num_blocks * bs)
    in_place = out.data_ptr() == text.data_ptr()
    if in_place and out.stride() != text.stride():
        raise InvalidArgument("out shares text_embeds' memory with other strides")
    if c.choose(backend, text.device) == "torch":
        if in_place:
            dst = torch.nonzero(rows >= 0).flatten()
            src = rows[dst].long()
            out[dst] = pages[src // bs, src % bs]
        else:
            out.copy_(refs.mm_embed(text, pages, rows))
        return out
    kernel = c.triton_module("mm_embed", text.device)
    with c.on_device(text.device):
        kernel.launch(c.as_bits(text), c.as_bits(pages), rows, c.as_bits(out))
    return out


def cached_source_rows(
    num_tokens: int, cache: MMTokenCache, placements: Sequence[tuple[int, MMEntry]]
) -> torch.Tensor:
    """``mm_source_rows`` for cached images: ``placements`` are (first row, entry) per image;
    the row map is on the cache's device. A prompt's map, sliced, serves each of its chunks."""
    return mm_source_rows(
        num_tokens,
        [(start, e.blocks, e.num_tokens) for start, e in placements],
        cache.block_size,
        num_blocks=cache.num_blocks,
        device=cache.device,
    )


def assemble_inputs_embeds(
    text_embeds: torch.Tensor,
    cache: MMTokenCache,
    placements: Sequence[tuple[int, MMEntry]],
    *,
    out: torch.Tensor | None = None,
    backend: c.Backend = "auto",
) -> torch.Tensor:
    """``mm_embed`` for cached images: ``placements`` are (first row, entry) per image.

    The caller holds each entry (``MMTokenCache.lookup``) until this returns (on CUDA: until
    the stream has run it).
    """
    num_tokens = text_embeds.shape[0] if isinstance(text_embeds, torch.Tensor) else -1
    rows = cached_source_rows(num_tokens, cache, placements)
    return mm_embed(text_embeds, cache.storage, rows, out=out, backend=backend, check_indices=False)
