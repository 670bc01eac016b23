# SPDX-License-Identifier: Apache-2.0
"""Which path a connection's bytes take, and whether it is slower than the placement allows.

Worked out at every handshake (``Peer.path``): the fastest path is the same process's memory
(``local``), then mapped shared memory or CUDA IPC on one host (``ipc``), then NIXL over RDMA
across hosts. A connection on a slower path than that, without the user asking for it, is
the failure users of NIXL report most often (a silent fall-back to TCP, noticed only when
throughput collapses), so it is a warning at the handshake, and an error for an agent made
with ``strict=True`` (``--strict``).

NOTE: UCX picks its transports per endpoint and NIXL does not report them; the NIXL rules
here read what decides that choice on this host (``UCX_TLS``, the RDMA devices in sysfs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("epdrt.transfer")

#: where the kernel lists RDMA devices (InfiniBand, RoCE)
RDMA_SYSFS = "/sys/class/infiniband"
# UCX_TLS names that cover shared memory and RDMA (aliases included; "^x" excludes x).
_SHM_TLS = {"all", "sm", "shm", "posix", "sysv", "cma", "xpmem", "knem"}
_RDMA_TLS = {"all", "ib", "rc", "rc_v", "rc_x", "rc_mlx5", "ud", "ud_v", "ud_x", "ud_mlx5",
             "dc", "dc_x", "dc_mlx5"}  # fmt: skip


@dataclass(frozen=True)
class LinkPath:
    """How one connection moves bytes.

    Attributes:
        transport: local, ipc, nixl or dist.
        detail: what carries the bytes, for people (e.g. "memfd shared memory").
        slow: why this path is slower than the placement allows; None when it is not.
    """

    transport: str
    detail: str
    slow: str | None = None


def ucx_tls() -> set[str]:
    """The transports ``UCX_TLS`` lets UCX use (``{"all"}`` when unset; ``^`` lists are read as
    "all but these": anything not excluded counts as allowed)."""
    raw = os.environ.get("UCX_TLS", "").strip()
    if not raw:
        return {"all"}
    if raw.startswith("^"):
        excluded = {t.strip() for t in raw[1:].split(",")}
        return (_SHM_TLS | _RDMA_TLS | {"tcp"}) - excluded - {"all"}
    return {t.strip() for t in raw.split(",") if t.strip()}


def rdma_devices() -> list[str]:
    """The RDMA devices of this host (empty without any, or without sysfs)."""
    try:
        return sorted(os.listdir(RDMA_SYSFS))
    except OSError:
        return []


def describe(transport: str, requested: str, same_host: bool, device: str) -> LinkPath:
    """The path of a connection that uses ``transport`` after ``requested`` was asked for
    ("auto" or a transport), between two agents on the same host or not, for regions on
    ``device`` ("cpu", "cuda:0", ...)."""
    if transport == "local":
        return LinkPath("local", "the same process's memory")
    if transport == "ipc":
        gpu = device.startswith("cuda")
        return LinkPath("ipc", "CUDA IPC" if gpu else "memfd shared memory")
    if transport == "nixl":
        tls, rdma = ucx_tls(), rdma_devices()
        detail = (
            f"NIXL/UCX, UCX_TLS={','.join(sorted(tls))}, RDMA devices: {','.join(rdma) or 'none'}"
        )
        slow = None
        if same_host and not tls & _SHM_TLS:
            slow = (
                f"UCX_TLS={os.environ.get('UCX_TLS')} leaves out shared memory: NIXL moves "
                "bytes between two processes of one host over the network stack"
            )
        elif not same_host and not rdma:
            slow = f"no RDMA device ({RDMA_SYSFS} is empty): NIXL/UCX falls back to TCP"
        elif not same_host and not tls & _RDMA_TLS:
            slow = f"UCX_TLS={os.environ.get('UCX_TLS')} leaves out RDMA: NIXL/UCX uses TCP"
        return LinkPath("nixl", detail, slow)
    detail = "torch.distributed (gloo/NCCL over TCP), staged through buffers on both sides"
    slow = None
    if requested == "auto" and not same_host:
        slow = (
            "the nixl package is not installed: bytes between hosts are staged through"
            " torch.distributed (pip install 'epdrt[nixl]')"
        )
    return LinkPath("dist", detail, slow)


def report(path: LinkPath, peer: str) -> None:
    """Warns, loudly, when ``path`` is slower than the placement allows."""
    if path.slow is not None:
        log.warning("transfers with %s go over %s: %s", peer, path.transport, path.slow)
