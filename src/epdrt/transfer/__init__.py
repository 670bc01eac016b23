# SPDX-License-Identifier: Apache-2.0
"""Transfers between memory regions and between processes.

- :class:`TransferEngine`: asynchronous batched copies between regions of this process.
- :class:`TransferAgent` / :class:`Peer`: one handshake per peer pair, then block-id transfers
  over the transport that fits where the peer is (same process, same host, another host).
- ``KVSender``/``KVReceiver``, ``MMSender``/``MMReceiver``: cache-to-cache helpers.
"""

from epdrt.errors import TransferError
from epdrt.transfer.agent import (
    TRANSPORTS,
    Peer,
    SendHandle,
    TransferAgent,
    host_identity,
    nixl_available,
)
from epdrt.transfer.caches import (
    KVReceiver,
    KVSender,
    MMReceiver,
    MMSender,
    register_kv_cache,
    register_mm_cache,
)
from epdrt.transfer.engine import Op, Transfer, TransferEngine
from epdrt.transfer.messages import Notice, RegionInfo

__all__ = [
    "TRANSPORTS",
    "KVReceiver",
    "KVSender",
    "MMReceiver",
    "MMSender",
    "Notice",
    "Op",
    "Peer",
    "RegionInfo",
    "SendHandle",
    "Transfer",
    "TransferAgent",
    "TransferEngine",
    "TransferError",
    "host_identity",
    "nixl_available",
    "register_kv_cache",
    "register_mm_cache",
]
