# SPDX-License-Identifier: Apache-2.0
"""Transfers between memory regions and between processes.

- :class:`TransferEngine`: asynchronous batched copies between regions of this process.
- :class:`TransferAgent` / :class:`Peer`: one handshake per peer pair, then block-id transfers
  over the transport that fits where the peer is (same process, same host, another host).
- ``KVSender``/``KVReceiver``, ``MMSender``/``MMReceiver``: cache-to-cache helpers.

The agent and the cache helpers need ZeroMQ and msgspec: they are imported on first use, so
``import epdrt`` (which takes the engine from here) works on a host without them.
"""

from importlib import import_module

from epdrt.errors import TransferError
from epdrt.transfer.engine import Op, Transfer, TransferEngine

# name -> the submodule that defines it, imported when the name is first used
_AGENT = ("TRANSPORTS", "Peer", "SendHandle", "TransferAgent", "host_identity", "nixl_available")
_CACHES = (
    "KVReceiver", "KVSender", "MMReceiver", "MMSender", "register_kv_cache", "register_mm_cache",
)  # fmt: skip
_LAZY = {
    **dict.fromkeys(_AGENT, "agent"),
    **dict.fromkeys(_CACHES, "caches"),
    **dict.fromkeys(("Notice", "RegionInfo"), "messages"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(f"epdrt.transfer.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'epdrt.transfer' has no attribute {name!r}")


__all__ = ["Op", "Transfer", "TransferEngine", "TransferError", *_LAZY]
