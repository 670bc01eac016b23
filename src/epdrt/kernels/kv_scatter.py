# SPDX-License-Identifier: Apache-2.0
"""KV scatter: write new tokens' K and V into paged-cache slots (dispatcher and checks)."""

from __future__ import annotations

import torch

from epdrt import _core
from epdrt.kernels import reference as refs

from . import _common as c


def kv_scatter(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: c.NativeBackend = "auto",
    check_indices: bool = True,
) -> None:
    """Writes token ``i``'s K/V into cache slot ``slot_mapping[i]``, in place.

    A flat batch of new tokens from several sequences (ragged lengths): the slots encode
    where each token goes, ``slot = block * block_size + offset``.

    Args:
        key: ``[n, H, D]`` for a one-layer ``kv_cache``, ``[L, n, H, D]`` for all layers; the
            ``[H, D]`` dims packed, other strides free. Same dtype as ``kv_cache``.
        value: same shape and dtype as ``key``.
        kv_cache: ``[num_blocks, 2, bs, H, D]`` (e.g. ``PagedKVCache.layer(l)``, strided) or
            ``[num_blocks, L, 2, bs, H, D]`` (``PagedKVCache.storage``); ``[H, D]`` packed.
        slot_mapping: ``[n]`` int64 or int32, contiguous, unique slots in
            ``[0, num_blocks * bs)``, on the cache's device.
        backend: "auto" (Triton on CUDA, "native" on CPU), "native" (the C++ core's host
            copy: one ``memcpy`` per row), "triton" (on CPU only under ``TRITON_INTERPRET=1``)
            or "torch" (the reference).
        check_indices: check slot range and uniqueness (one device sync); pass False only for
            slots known good (e.g. from ``PagedKVCache.reserve``).

    Raises:
        InvalidArgument: before any launch, for bad shapes, dtypes, devices, strides or slots.
    """
    cache, one_layer = c.kv_cache_6d(kv_cache)
    num_blocks, num_layers, _, bs, heads, dim = cache.shape
    key = c.tensor("key", key, 3 if one_layer else 4, device=cache.device)
    value = c.tensor("value", value, key.dim(), device=cache.device)
    n = key.shape[-3]
    want = (n, heads, dim) if one_layer else (num_layers, n, heads, dim)
    c.shape_is("key", key, want)
    c.shape_is("value", value, want)
    c.same_dtype("key", key, "kv_cache", cache)
    c.same_dtype("value", value, "kv_cache", cache)
    c.inner_contiguous("key", key, 2)
    c.inner_contiguous("value", value, 2)
    slots = c.tensor(
        "slot_mapping", slot_mapping, 1, dtype=(torch.int64, torch.int32), device=cache.device
    )
    c.shape_is("slot_mapping", slots, (n,))
    c.contiguous("slot_mapping", slots)
    if check_indices:
        c.in_range("slot_mapping", slots, 0, num_blocks * bs)
        c.unique("slot_mapping", slots)
    chosen = c.choose_native(backend, cache.device)
    if chosen == "torch":
        refs.kv_scatter(key, value, kv_cache, slots)
        return
    if one_layer:
        key, value = key.unsqueeze(0), value.unsqueeze(0)
    if chosen == "native":
        _native(key, value, cache, slots)
        return
    kernel = c.triton_module("kv_scatter", cache.device)
    with c.on_device(cache.device):
        kernel.launch(c.as_bits(key), c.as_bits(value), c.as_bits(cache), slots)


def _native(
    key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """The host copy: ``key``/``value`` ``[L, n, H, D]``, ``cache`` 6-D, all checked."""
    size = cache.element_size()
    _core.kv_scatter_host(
        key.data_ptr(), key.stride(0) * size, key.stride(1) * size,
        value.data_ptr(), value.stride(0) * size, value.stride(1) * size,
        cache.data_ptr(), *(stride * size for stride in cache.stride()[:4]),
        slots.data_ptr(), slots.dtype == torch.int64, slots.shape[0], cache.shape[1],
        cache.shape[3], cache.shape[4] * cache.shape[5] * size,
    )  # fmt: skip
