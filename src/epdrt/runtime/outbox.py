# SPDX-License-Identifier: Apache-2.0
"""The router's outbox: control messages sent from threads of their own, one per peer.

The router decides what to send while it holds its lock (so the order of its decisions is the
order on the wire to each peer) but never waits for a peer under it: a send that blocks (a
worker that stopped reading holds a send up to the channel's timeout) delays only the messages
to that worker, never the token streams of every request.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import msgspec
import torch

from epdrt.runtime.channel import Channel, ChannelError

#: Called on the peer's sender thread when a send fails, with the error.
OnFail = Callable[[ChannelError], None]

_STOP = object()


class Outbox:
    """Queues messages for named peers of ``channel``; each peer's are sent in queue order."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def post(
        self,
        peer: str,
        msg: msgspec.Struct,
        tensors: Sequence[torch.Tensor] = (),
        on_fail: OnFail | None = None,
    ) -> None:
        """Queues ``msg`` (and its tensor frames) for ``peer``; never blocks."""
        with self._lock:
            q = self._queues.get(peer)
            if q is None:
                q = self._queues[peer] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._send_loop, args=(peer, q), name=f"epdrt-send-{peer}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        q.put((msg, tensors, on_fail))

    def _send_loop(self, peer: str, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            msg, tensors, on_fail = item
            try:
                self._channel.send(peer, msg, tensors)
            except ChannelError as exc:
                if on_fail is not None:
                    on_fail(exc)

    def close(self, timeout_s: float) -> None:
        """Sends what is queued (each peer's thread stops after its queue), waiting up to
        ``timeout_s`` seconds in all."""
        with self._lock:
            for q in self._queues.values():
                q.put(_STOP)
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s / max(len(threads), 1))
