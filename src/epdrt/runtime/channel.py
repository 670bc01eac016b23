# SPDX-License-Identifier: Apache-2.0
"""ZeroMQ control channel: each process receives on one PULL socket and pushes to peers.

Endpoints are ``ipc://`` paths in the cluster's private run directory (or ``tcp://127.0.0.1``
when given), never a public interface. Sends never block forever: a peer that stopped reading
makes ``send`` raise after ``send_timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence

import msgspec
import torch
import zmq

from epdrt.errors import EpdrtError
from epdrt.runtime.messages import CODEC


class ChannelError(EpdrtError):
    """A control message could not be sent (the peer is gone or not reading)."""


class Channel:
    """Receives on ``endpoint``; sends to named peers registered with ``connect``."""

    def __init__(self, endpoint: str, *, send_timeout_s: float = 30.0) -> None:
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
        return CODEC.decode(frames)

    def close(self) -> None:
        with self._peers_lock:
            for sock, lock in self._peers.values():
                with lock:
                    sock.close(linger=0)
            self._peers.clear()
        self._pull.close()
