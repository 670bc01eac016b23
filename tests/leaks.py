# SPDX-License-Identifier: Apache-2.0
"""Leak checks for epdrt's memory regions.

CPU regions are anonymous memfds ("memfd:epdrt-region"): they never appear in /dev/shm, so
only the processes that map them or hold their fds can show a leak. These helpers name a
region by its inode and find who still holds it.
"""

from __future__ import annotations

import os
from pathlib import Path

TAG = "memfd:epdrt-region"


def region_inodes(pid: int | str = "self") -> set[str]:
    """Inodes of the epdrt regions process ``pid`` maps or holds an fd of (empty if gone)."""
    found: set[str] = set()
    proc = Path(f"/proc/{pid}")
    try:
        with open(proc / "maps") as f:
            found |= {line.split()[4] for line in f if TAG in line}
        for fd in (proc / "fd").iterdir():
            try:
                if TAG in os.readlink(fd):
                    found.add(str(os.stat(fd).st_ino))
            except OSError:
                continue  # closed meanwhile
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return found


def holders(inodes: set[str]) -> set[int]:
    """Every process on the host that still maps or holds one of ``inodes``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and region_inodes(entry.name) & inodes:
            pids.add(int(entry.name))
    return pids
