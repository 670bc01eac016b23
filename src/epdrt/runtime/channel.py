# SPDX-License-Identifier: Apache-2.0
"""ZeroMQ control channel: each process receives on one PULL socket and pushes to peers.

Endpoints are ``ipc://`` paths in the cluster's private run directory, or ``tcp://`` ones
(``EPDConfig.control="tcp"``), whose messages are signed: with the cluster's secret, every
message carries a keyed BLAKE2b tag of all its frames, and one whose tag is missing or wrong is
dropped and counted (``Channel.rejected``). A ``tcp://`` endpoint on an address other than
loopback needs a secret. Sends never block forever: a peer that stopped reading makes ``send``
raise after ``send_timeout_s``.

NOTE: the tag authenticates, it does not encrypt, and does not stop a replay of a captured
message: the control network is a cluster's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Sequence

import msgspec
import torch
import zmq

from epdrt.errors import EpdrtError, InvalidArgument
from epdrt.runtime.messages import CODEC

log = logging.getLogger("epdrt.runtime")

#: Environment variable that hands the cluster's control secret (hex) to its workers: not on
#: their command lines, which other users of the host can read.
SECRET_ENV = "EPDRT_CONTROL_SECRET"
_TAG_BYTES = 32


class ChannelError(EpdrtError):
    """A control message could not be sent (the peer is gone or not reading)."""


def signature(secret: bytes, frames: Sequence[bytes | memoryview]) -> bytes:
    """The tag of a message: keyed BLAKE2b over each frame's length and bytes."""
    h = hashlib.blake2b(key=secret, digest_size=_TAG_BYTES)
    for frame in frames:
        h.update(len(frame).to_bytes(8, "little"))
        h.update(frame)
    return h.digest()


def _loopback_or_local(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Channel:
    """Receives on ``endpoint``; sends to named peers registered with ``connect``.

    ``secret``: sign every message sent and drop every message received without a valid tag
    (required for a ``tcp://`` endpoint beyond loopback).
    """

    def __init__(
        self, endpoint: str, *, send_timeout_s: float = 30.0, secret: bytes | None = None
    ) -> None:
        if secret is None and not _loopback_or_local(endpoint):
            raise InvalidArgument(f"{endpoint} is not loopback: the control channel needs a secret")
        self._secret = secret
        #: messages dropped because their tag was missing or wrong
        self.rejected = 0
        self._ctx = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(endpoint)
        self.endpoint = endpoint
        self._send_timeout_ms = int(send_timeout_s * 1000)
        # Sends may come from several threads; each peer's socket has a lock of its own, so a
        # peer that stopped reading delays only the sends to it.
        self._peers: dict[str, tuple[zmq.Socket, threading.Lock]] = {}
        self._peers_lock = threading.Lock()
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._watched: list[int] = []

    def watch(self, fd: int) -> None:
        """Makes ``recv`` also return (None) as soon as eventfd ``fd`` (non-blocking) is
        signalled; ``recv`` resets it."""
        self._poller.register(fd, zmq.POLLIN)
        self._watched.append(fd)

    def connect(self, name: str, endpoint: str) -> None:
        with self._peers_lock:
            if name not in self._peers:
                self._peers[name] = (self._push(endpoint), threading.Lock())

    def reconnect(self, name: str, endpoint: str) -> None:
        """Connects to ``name`` afresh (a restarted peer): what was queued for the old process
        is dropped, not delivered to the new one."""
        with self._peers_lock:
            old = self._peers.pop(name, None)
            self._peers[name] = (self._push(endpoint), threading.Lock())
        if old is not None:
            with old[1]:
                old[0].close(linger=0)

    def _push(self, endpoint: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDTIMEO, self._send_timeout_ms)
        sock.connect(endpoint)
        return sock

    def send(self, peer: str, msg: msgspec.Struct, tensors: Sequence[torch.Tensor] = ()) -> None:
        frames = CODEC.encode(msg, tensors)
        if self._secret is not None:
            frames.append(signature(self._secret, frames))
        with self._peers_lock:
            entry = self._peers.get(peer)
        if entry is None:
            raise ChannelError(f"no connection to {peer!r}")
        sock, lock = entry
        try:
            with lock:
                if sock.closed:
                    raise ChannelError(f"the connection to {peer!r} is closed")
                sock.send_multipart(frames, copy=False)
        except zmq.Again as exc:
            raise ChannelError(f"{peer} did not accept a message in time") from exc

    def recv(self, timeout_s: float) -> tuple[object, list[bytes]] | None:
        """The next message and its tensor frames; None after ``timeout_s`` seconds, or
        earlier when a watched fd was signalled and no message is waiting."""
        ready = dict(self._poller.poll(max(0, int(timeout_s * 1000))))
        for fd in self._watched:
            if fd in ready:
                with contextlib.suppress(BlockingIOError):  # reset by another reader first
                    os.eventfd_read(fd)
        if self._pull not in ready:
            return None
        frames = self._pull.recv_multipart()
        if self._secret is not None:
            tag = frames.pop() if len(frames) > 1 else b""
            if not hmac.compare_digest(tag, signature(self._secret, frames)):
                self.rejected += 1
                if self.rejected == 1 or self.rejected % 1000 == 0:
                    log.warning("%s: dropped %d unsigned or forged control message(s)",
                                self.endpoint, self.rejected)  # fmt: skip
                return None
        return CODEC.decode(frames)

    def close(self) -> None:
        with self._peers_lock:
            for sock, lock in self._peers.values():
                with lock:
                    sock.close(linger=0)
            self._peers.clear()
        self._pull.close()
