# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the kernel tests: bit-exact random data and the device grid."""

from __future__ import annotations

import pytest
import torch

#: integer dtype of each element size, to compare floats bit for bit
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Triton on CPU tensors needs the interpreter, which conftest turns on only on hosts without a GPU.
CPU_TRITON = pytest.mark.skipif(
    torch.cuda.is_available(), reason="Triton runs on CPU tensors only under TRITON_INTERPRET"
)
DEVICES = [pytest.param("cpu", marks=CPU_TRITON), pytest.param("cuda", marks=pytest.mark.gpu)]


def random_bits(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities, -0.0 included): copies must keep every bit."""
    bits = BITS[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=bits).view(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = BITS[a.element_size()]
    return a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))
