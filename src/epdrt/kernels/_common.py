# SPDX-License-Identifier: Apache-2.0
"""Argument checks and backend choice shared by the kernel dispatchers.

Every check raises :class:`epdrt.InvalidArgument` before anything is launched.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch

from epdrt.errors import EpdrtError, InvalidArgument

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")
#: Backends of kernels that also have a host implementation in the C++ core.
NativeBackend = Literal["auto", "native", "triton", "torch"]

#: Integer dtype of the same width, used to move float data bit-exactly.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the integer dtype of its element size (no copy)."""
    return t.view(_BITS_DTYPE[t.element_size()])


def choose(backend: str, device: torch.device) -> str:
    """Resolves ``backend`` for tensors on ``device``: "triton" or "torch".

    "auto" takes Triton on CUDA and the torch reference on CPU (the interpreter is far slower).
    """
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def choose_native(backend: str, device: torch.device) -> str:
    """Resolves ``backend`` for a kernel with a host implementation in the C++ core: "native"
    (CPU tensors only; what "auto" takes on CPU), "triton" or "torch"."""
    if backend == "native" or (backend == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise InvalidArgument(f"the native backend runs on CPU tensors, not {device}")
        return "native"
    return choose(backend, device)


def triton_module(name: str, device: torch.device) -> ModuleType:
    """Imports ``epdrt.kernels._triton.<name>`` (Triton is imported on first use only).

    Raises EpdrtError when Triton is missing, or for CPU tensors unless the kernels were
    decorated under ``TRITON_INTERPRET=1`` (set it before the first Triton call).
    """
    try:
        module = importlib.import_module(f"epdrt.kernels._triton.{name}")
    except ImportError as exc:
        raise EpdrtError(f"the Triton path needs triton (pip install triton): {exc}") from exc
    if device.type == "cpu" and not module.INTERPRETED:
        raise EpdrtError(
            "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1"
            " before the first Triton kernel is used (now: "
            f"{os.environ.get('TRITON_INTERPRET', 'unset')})"
        )
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"unsupported device {device}")
    return module


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Makes ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def tensor(
    name: str,
    value: object,
    ndim: int | Sequence[int],
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Checks that ``value`` is a tensor of rank ``ndim`` (one of), dtype (one of) and device."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise InvalidArgument(f"{name} must be {want}, got shape {list(value.shape)}")
    if dtype is not None:
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if value.dtype not in dtypes:
            raise InvalidArgument(f"{name} must have dtype {' or '.join(map(str, dtypes))},"
                                  f" got {value.dtype}")  # fmt: skip
    if device is not None and value.device != device:
        raise InvalidArgument(f"{name} is on {value.device}, expected {device}")
    return value


def same_dtype(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise InvalidArgument(f"{name} has dtype {value.dtype}; {ref_name} has {ref.dtype}")


def shape_is(name: str, value: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise InvalidArgument(f"{name} must have shape {list(shape)}, got {list(value.shape)}")


def contiguous(name: str, value: torch.Tensor) -> None:
    if not value.is_contiguous():
        raise InvalidArgument(f"{name} must be contiguous (strides {value.stride()})")


def inner_contiguous(name: str, value: torch.Tensor, num_dims: int) -> None:
    """Checks that the last ``num_dims`` dimensions are packed (row-major, no gaps)."""
    expected = 1
    dims = zip(reversed(value.shape[-num_dims:]), reversed(value.stride()[-num_dims:]))
    for size, stride in dims:
        if size != 1 and stride != expected:
            raise InvalidArgument(
                f"{name}'s last {num_dims} dims must be contiguous, got shape"
                f" {list(value.shape)} strides {list(value.stride())}"
            )
        expected *= size


def in_range(name: str, index: torch.Tensor, low: int, high: int) -> None:
    """Checks ``low <= index < high`` element-wise (one device sync for CUDA tensors)."""
    if index.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.stack(torch.aminmax(index)).tolist())
    if lo < low or hi >= high:
        raise InvalidArgument(f"{name} must be in [{low}, {high}), got values in [{lo}, {hi}]")


def unique(name: str, index: torch.Tensor) -> None:
    """Checks that ``index`` (1-D) has no repeated value: concurrent writers would race."""
    if index.numel() > 1 and torch.unique(index).numel() != index.numel():
        raise InvalidArgument(f"{name} has repeated entries: each destination is written once")


def kv_cache_6d(kv_cache: object) -> tuple[torch.Tensor, bool]:
    """Checks a paged KV tensor; returns its 6-D form and whether it was one layer (5-D).

    ``[num_blocks, 2, bs, H, D]`` (one layer, e.g. ``PagedKVCache.layer(l)``) or
    ``[num_blocks, L, 2, bs, H, D]``; any strides except that ``[H, D]`` must be packed.
    """
    cache = tensor("kv_cache", kv_cache, (5, 6))
    one_layer = cache.dim() == 5
    if one_layer:
        cache = cache.unsqueeze(1)
    if cache.shape[2] != 2:
        raise InvalidArgument(
            f"kv_cache's K/V dim must have size 2, got shape {list(kv_cache.shape)}"  # type: ignore[attr-defined]
        )
    inner_contiguous("kv_cache", cache, 2)
    if cache.element_size() not in _BITS_DTYPE:
        raise InvalidArgument(f"unsupported kv_cache dtype {cache.dtype}")
    return cache, one_layer
