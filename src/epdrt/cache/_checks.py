# SPDX-License-Identifier: Apache-2.0
"""Argument checks shared by the caches: each raises InvalidArgument with a clear message."""

from __future__ import annotations

import torch

from epdrt.errors import InvalidArgument


def positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
    return value


def cache_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f"cache dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def tensor_arg(
    name: str,
    value: object,
    shape: tuple[int | None, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Checks a tensor's rank, sizes (None = any), dtype and device; returns it unchanged."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape)
    ):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise InvalidArgument(f"{name} must have shape {want}, got {list(value.shape)}")
    if value.dtype != dtype:
        raise InvalidArgument(f"{name} has dtype {value.dtype}; the cache holds {dtype}")
    if value.device != device:
        raise InvalidArgument(f"{name} is on {value.device}; the cache is on {device}")
    return value
