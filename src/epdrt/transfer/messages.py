# SPDX-License-Identifier: Apache-2.0
"""Control messages between transfer agents: msgspec structs, MessagePack on the wire.

Nothing received is ever unpickled: a frame decodes into one of these structs or is rejected.
"""

from __future__ import annotations

import msgspec


class RegionInfo(msgspec.Struct, frozen=True):
    """A region as its owner announces it at the handshake.

    ``descriptor`` opens it on the same host (memfd or CUDA IPC); ``address`` is its base in the
    owner's address space (what NIXL needs to write into it from another host).
    """

    name: str
    descriptor: bytes
    nbytes: int
    device: str  # "cpu" or "cuda:N"
    address: int
    block_nbytes: int = 0  # bytes per block when the region is a block cache, else 0
    layout: str = ""  # free-form cache layout; senders check it matches their own


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """Connector -> listener: who I am, what I have, which transport I want."""

    name: str
    pid: int
    host: str  # host identity: hostname + boot id
    address: str  # where the listener connects back
    transport: str  # "auto" or a backend name
    regions: list[RegionInfo]


class Welcome(msgspec.Struct, frozen=True, tag="welcome"):
    """Listener -> connector: the chosen transport and its setup data, or why not."""

    name: str
    pid: int
    host: str
    address: str
    transport: str
    regions: list[RegionInfo]
    setup: bytes = b""
    error: str = ""


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """Connector -> listener: the connector's setup data; the pair is now connected."""

    setup: bytes = b""
    error: str = ""


class Notice(msgspec.Struct, frozen=True, tag="notice"):
    """What a receiver gets: data landed in its region (``region`` set), or a plain message.

    ``blocks`` are the destination block ids (or what the sender chose to say); ``part`` of
    ``num_parts`` numbers the pieces of one ``key`` (e.g. layers of one sequence's KV).
    """

    key: str
    part: int = 0
    num_parts: int = 1
    region: str = ""
    blocks: list[int] = []
    nbytes: int = 0
    data: bytes = b""
    # Transport fields: a sequence number (torch.distributed tag) and, for transports that
    # stage through a contiguous buffer, the destination ranges as int64 (offset, size) pairs.
    seq: int = 0
    ranges: bytes = b""


class Bye(msgspec.Struct, frozen=True, tag="bye"):
    """The sender is closing the connection."""

    reason: str = ""


Message = Hello | Welcome | Ready | Notice | Bye

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes) -> Message:
    """Decodes one frame; raises msgspec.DecodeError (ValidationError) when it is not a Message."""
    return _decoder.decode(frame)
