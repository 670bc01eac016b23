# SPDX-License-Identifier: Apache-2.0
"""keep_freed_host_memory: large allocations come from the heap, not fresh mappings."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
import torch
from epdrt.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_host_memory() and keep_freed_host_memory()  # idempotent
before = libc.mallinfo2().hblkhd  # bytes in separately mapped blocks (imports made some)
big = torch.empty(64 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold
big.fill_(1)
print(libc.mallinfo2().hblkhd - before)
"""


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_large_blocks_come_from_the_heap_only_when_kept(mode):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    mapped = int(out.stdout.split()[-1])  # by the 64 MiB allocation
    if mode == "keep":
        assert mapped == 0
    else:
        assert mapped >= 64 << 20
