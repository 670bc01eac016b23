# SPDX-License-Identifier: Apache-2.0
"""Triton kernels and their launchers; imported on first use by the dispatchers in
``epdrt.kernels`` (so ``TRITON_INTERPRET`` is read then, and ``import epdrt`` stays light).

Launchers take arguments the dispatchers have already checked; float data arrives viewed as
integers of the same width (bit-exact moves, one compiled variant per element size).
"""

from __future__ import annotations

import triton


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def row_tiles(row: int, interpreted: bool, tile_elems: int = 4096) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_R)`` for copying rows of ``row`` elements, ``BLOCK_T`` rows at a time.

    NOTE: on a GPU a program moves about ``tile_elems`` elements per loop step (8 KiB of 16-bit
    data). The interpreter pays per program, not per element, so it takes whole rows and many.
    """
    width = triton.next_power_of_2(row)
    if interpreted:
        return max(1, min(128, (1 << 16) // width)), width
    block_r = min(width, 1024)
    return max(1, tile_elems // block_r), block_r
