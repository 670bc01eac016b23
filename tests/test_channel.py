# SPDX-License-Identifier: Apache-2.0
"""The control channel (epdrt.runtime.channel): signed tcp:// messages, and what happens to
unsigned, forged or tampered ones (dropped and counted, never decoded)."""

from __future__ import annotations

import secrets
import socket

import pytest
import torch
import zmq

from epdrt import InvalidArgument
from epdrt.runtime import messages as m
from epdrt.runtime.channel import Channel, signature
from epdrt.runtime.messages import CODEC

TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv(ch: Channel) -> tuple[object, list[bytes]] | None:
    """The next message, or None when what arrived was dropped (or nothing did)."""
    return ch.recv(TIMEOUT_S)


@pytest.fixture
def pair():
    """A receiving channel on tcp with a secret, and a raw PUSH socket connected to it."""
    secret = secrets.token_bytes(32)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    rx = Channel(endpoint, secret=secret)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    yield rx, push, secret, endpoint
    push.close()
    rx.close()


def test_signed_messages_arrive_with_their_tensors(pair):
    rx, _push, secret, endpoint = pair
    tx = Channel(f"tcp://127.0.0.1:{_free_port()}", secret=secret)
    tx.connect("rx", endpoint)
    extras = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    tx.send("rx", m.KVPulled("r1"))
    tx.send("rx", m.Failed("r2", "boom"), [extras])
    msg, frames = _recv(rx)
    assert msg == m.KVPulled("r1") and frames == []
    msg, frames = _recv(rx)
    assert msg == m.Failed("r2", "boom") and len(frames) == 1
    assert rx.rejected == 0
    tx.close()


@pytest.mark.parametrize("forgery", ["unsigned", "wrong key", "tampered", "tag only"])
def test_unsigned_or_forged_messages_are_dropped_and_counted(pair, forgery):
    rx, push, secret, _endpoint = pair
    frames = CODEC.encode(m.Failed("r1", "injected"))
    frames = [bytes(f) for f in frames]
    if forgery == "unsigned":
        sent = frames
    elif forgery == "wrong key":
        sent = [*frames, signature(secrets.token_bytes(32), frames)]
    elif forgery == "tampered":
        tag = signature(secret, frames)
        sent = [CODEC.encode(m.Failed("r1", "changed"))[0], tag]
    else:
        sent = [signature(secret, frames)]
    push.send_multipart(sent)
    assert _recv(rx) is None
    assert rx.rejected == 1
    # The channel goes on: a good message after the forged one is delivered.
    push.send_multipart([*frames, signature(secret, frames)])
    msg, _ = _recv(rx)
    assert msg == m.Failed("r1", "injected") and rx.rejected == 1


def test_tcp_beyond_loopback_needs_a_secret():
    with pytest.raises(InvalidArgument, match="needs a secret"):
        Channel("tcp://0.0.0.0:0")
    # Loopback and ipc endpoints may go unsigned (the run directory is private).
    Channel(f"tcp://127.0.0.1:{_free_port()}").close()
