# SPDX-License-Identifier: Apache-2.0
"""The notice channel (csrc/notice_channel.cc) and the notice sockets of same-host agents
(epdrt.transfer.notices): a notice leaves only once its transfer and every earlier notice have,
from the thread that finished the copy; a failed copy's notice is dropped; long notices go in
fragments; a full socket keeps notices queued; a dead peer is an error, not a hang.

NOTE: a CPU copy cannot fail once submitted (its ranges are checked first), so the rule that a
failed transfer's notice is dropped (``notices_dropped``) is only reachable with CUDA copies.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

import pytest
import torch
import zmq

from epdrt import Region, TransferError, _core
from epdrt.transfer import TransferAgent, TransferEngine
from epdrt.transfer.notices import NoticeInbox, open_channel, setup_bytes

TIMEOUT_S = 30.0
LAST, MORE = 0, 1


def _pair(rcvbuf: int | None = None) -> tuple[_core.NoticeChannel, socket.socket]:
    """A channel and the socket its notices arrive on."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if rcvbuf is not None:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    channel = _core.NoticeChannel(a.detach())
    b.settimeout(TIMEOUT_S)
    return channel, b


def _read_notice(sock: socket.socket) -> bytes:
    parts = []
    while True:
        msg = sock.recv(1 << 17)
        assert msg and msg[0] in (LAST, MORE)
        parts.append(msg[1:])
        if msg[0] == LAST:
            return b"".join(parts)


@pytest.mark.parametrize("size", [1, 100, 60 << 10, (60 << 10) + 1, 1 << 20])
def test_notices_arrive_whole_and_in_order_whatever_their_size(size):
    channel, sock = _pair()
    notices = [bytes([i]) * size for i in range(1, 4)]
    reader = threading.Thread(target=lambda: got.extend(_read_notice(sock) for _ in notices))
    got: list[bytes] = []
    reader.start()
    for n in notices:
        channel.post(None, n)
    deadline = time.monotonic() + TIMEOUT_S
    while channel.flush() and time.monotonic() < deadline:
        time.sleep(1e-3)  # a notice over the socket's buffer waits for the reader
    reader.join(TIMEOUT_S)
    assert got == notices
    assert channel.notices_sent == 3 and channel.pending == 0
    assert channel.bytes_sent == 3 * size


def test_a_notice_waits_for_its_transfer_and_holds_later_ones_back():
    # One worker thread: a 64 MiB copy occupies it while a second transfer queues behind it.
    engine = TransferEngine(1, inline_bytes=0)
    src, dst = Region.create(64 << 20), Region.create(64 << 20)
    channel, sock = _pair()
    sock.setblocking(False)
    big = engine.submit_blocks(src, dst, [0], [0], 64 << 20)
    channel.post(big._handle, b"big")
    channel.post(None, b"plain")  # no transfer of its own: still after "big"
    if not big.done():
        with pytest.raises(BlockingIOError):
            sock.recv(100)
        assert channel.pending == 2
    big.wait(TIMEOUT_S)
    sock.settimeout(TIMEOUT_S)
    # Sent by the worker that finished the copy: nobody called flush().
    assert [_read_notice(sock), _read_notice(sock)] == [b"big", b"plain"]


def test_an_inline_copy_has_its_notice_on_the_wire_when_post_returns():
    engine = TransferEngine(1)
    src, dst = Region.create(1 << 16), Region.create(1 << 16)
    channel, sock = _pair()
    t = engine.submit_blocks(src, dst, [0], [4096], 4096)
    assert t.path == "host-inline" and t.done()
    channel.post(t._handle, b"small")
    sock.setblocking(False)
    assert _read_notice(sock) == b"small"


def test_a_full_socket_keeps_notices_queued_until_flush():
    channel, sock = _pair(rcvbuf=4096)
    sock.setblocking(False)
    for i in range(64):
        channel.post(None, bytes([i]) * 1000)
    assert channel.pending > 0  # the socket filled up: nothing blocked, nothing lost
    got = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < 64 and time.monotonic() < deadline:
        try:
            got.append(_read_notice(sock))
        except BlockingIOError:
            channel.flush()
    assert got == [bytes([i]) * 1000 for i in range(64)]
    assert channel.pending == 0


def test_a_closed_peer_is_an_error_not_a_hang():
    channel, sock = _pair()
    sock.close()
    channel.post(None, b"first")  # may go into the dead socket's buffer or fail
    assert channel.flush() == 0
    assert "notice" in channel.error
    with pytest.raises(TransferError):
        channel.post(None, b"again")
    channel.close()
    with pytest.raises(Exception, match="closed"):
        channel.post(None, b"after close")


def test_an_empty_notice_is_refused():
    channel, _sock = _pair()
    with pytest.raises(Exception, match="at least one byte"):
        channel.post(None, b"")


def test_the_inbox_takes_notices_of_known_tokens_only():
    poller = zmq.Poller()
    inbox = NoticeInbox("test", poller)
    owner = object()
    token = inbox.expect(owner)
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stranger.connect("\0" + inbox.address[1:])
    stranger.send(bytes([LAST]) + b"not a token")
    channel = open_channel(inbox.address, token)
    channel.post(None, b"hello")
    got: list[tuple[object, bytes]] = []
    deadline = time.monotonic() + TIMEOUT_S
    while not got and time.monotonic() < deadline:
        poller.poll(10)
        inbox.drain(lambda o, n: got.append((o, n)))
    assert got == [(owner, b"hello")]
    stranger.settimeout(TIMEOUT_S)
    assert stranger.recv(10) == b""  # the stranger's connection was closed
    assert setup_bytes(inbox.address, token).startswith(token.hex().encode())
    channel.close()
    inbox.close()


@pytest.mark.parametrize("spin_s", [0.0, 100e-6])
def test_agents_exchange_notices_over_the_notice_socket(spin_s):
    a = TransferAgent(timeout=TIMEOUT_S, spin_s=spin_s)
    b = TransferAgent(timeout=TIMEOUT_S, spin_s=spin_s)
    ra, rb = Region.create(1 << 20), Region.create(1 << 20)
    ra.tensor(torch.uint8, (1 << 20,)).fill_(7)
    a.register("buf", ra)
    b.register("buf", rb)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(b.accept()))
    t.start()
    pa = a.connect(b.address, transport="ipc")
    t.join(TIMEOUT_S)
    pb = accepted[0]
    # An inline copy (4 KiB), one on the engine's threads (1 MiB - 4 KiB), a plain notice.
    handles = [pa.write("small", "buf", "buf", [0], [0], 4096)]
    handles.append(pa.write("big", "buf", "buf", [4096], [4096], (1 << 20) - 4096))
    pa.notify("after", data=b"x")
    for h in handles:
        h.wait()
    assert [pb.recv(timeout=TIMEOUT_S).key for _ in range(3)] == ["small", "big", "after"]
    assert int(rb.tensor(torch.uint8, (1 << 20,)).sum()) == 7 * (1 << 20)
    assert pa.backend._channel.notices_sent == 3
    # Notices sent before a goodbye are received before it drops the peer.
    pa.write("last", "buf", "buf", [0], [0], 16).wait()
    pa.close("done")
    assert pb.recv("last", timeout=TIMEOUT_S).nbytes == 16
    with pytest.raises(TransferError):
        pb.recv(timeout=TIMEOUT_S)
    a.close()
    b.close()


def _connect_and_close() -> None:
    a, b = TransferAgent(timeout=TIMEOUT_S), TransferAgent(timeout=TIMEOUT_S)
    a.register("buf", Region.create(4096))
    b.register("buf", Region.create(4096))
    t = threading.Thread(target=b.accept)
    t.start()
    a.connect(b.address, transport="ipc")
    t.join(TIMEOUT_S)
    a.close()
    b.close()


def test_closing_agents_closes_their_notice_sockets():
    _connect_and_close()  # the first agent of a process opens ZeroMQ's context for good
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        _connect_and_close()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
