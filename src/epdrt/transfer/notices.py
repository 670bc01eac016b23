# SPDX-License-Identifier: Apache-2.0
"""Notice sockets between agents of one host: the ``local`` and ``ipc`` transports announce
finished copies over them instead of the control socket.

Each agent listens on a ``SOCK_SEQPACKET`` unix socket with an abstract name (no file to
leak). At the handshake each side tells the other its socket's name and a token; the other
connects, sends the token (identifying the connection as that peer's) and hands the socket to
a C++ ``NoticeChannel`` (``csrc/include/epdrt/notice_channel.h``), which sends each notice
from whichever thread finishes the transfer. No interpreter runs between a copy's end and its
notice leaving.

Framing: every message leads with one byte, ``NoticeChannel.kMore`` (more of this notice
follows) or ``kLast``; the first notice of a connection is the token.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Callable, Iterator

import zmq

from epdrt import _core
from epdrt.errors import TransferError

_LAST, _MORE = 0, 1
#: Largest message a channel sends: one lead byte and a fragment.
_MESSAGE_BYTES = 1 + int(_core.NoticeChannel.fragment_bytes)
#: Accepted connections that have not sent their token yet, at most.
_MAX_UNIDENTIFIED = 64


def _seqpacket() -> socket.socket:
    return socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )


class _Connection:
    """One accepted connection: whose it is once identified, and a notice cut in fragments."""

    __slots__ = ("owner", "parts", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.owner: object | None = None
        self.parts: list[bytes] = []


class NoticeInbox:
    """This agent's listening socket and the connections peers opened to it.

    Owns the sockets; registers them with ``poller`` (the agent's) as they come and go.
    """

    def __init__(self, agent_name: str, poller: zmq.Poller) -> None:
        self._poller = poller
        self._listener = _seqpacket()
        name = f"epdrt-notice-{agent_name}-{secrets.token_hex(4)}"
        self._listener.bind("\0" + name)
        self._listener.listen(128)
        #: where peers connect: the abstract name, "@"-prefixed as in ``ipc://@``
        self.address = "@" + name
        self._poller.register(self._listener.fileno(), zmq.POLLIN)
        self._conns: dict[int, _Connection] = {}
        self._expected: dict[bytes, object] = {}  # token -> the peer it identifies

    def expect(self, owner: object) -> bytes:
        """A new token that will identify ``owner``'s connection."""
        token = secrets.token_bytes(16)
        self._expected[token] = owner
        return token

    def forget(self, owner: object) -> None:
        """Closes ``owner``'s connections and drops its tokens (the peer is gone)."""
        for token in [t for t, o in self._expected.items() if o is owner]:
            del self._expected[token]
        for fd in [fd for fd, c in self._conns.items() if c.owner is owner]:
            self._close(fd)

    @property
    def connected(self) -> bool:
        """Whether any peer has a connection open to this inbox."""
        return bool(self._conns)

    def owns(self, fd: object) -> bool:
        return fd == self._listener.fileno() or fd in self._conns

    def drain(self, deliver: Callable[[object, bytes], None], accept: bool = True) -> None:
        """Accepts new connections (``accept``) and hands every whole notice that arrived to
        ``deliver(owner, notice)``, in order per connection."""
        if accept:
            self._accept()
        for fd, conn in list(self._conns.items()):
            for notice in self._read(fd, conn):
                deliver(conn.owner, notice)

    def close(self) -> None:
        for fd in list(self._conns):
            self._close(fd)
        with contextlib.suppress(KeyError):
            self._poller.unregister(self._listener.fileno())
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            unidentified = sum(c.owner is None for c in self._conns.values())
            if unidentified >= _MAX_UNIDENTIFIED:
                sock.close()
                continue
            sock.setblocking(False)
            self._conns[sock.fileno()] = _Connection(sock)
            self._poller.register(sock.fileno(), zmq.POLLIN)

    def _read(self, fd: int, conn: _Connection) -> Iterator[bytes]:
        while self._conns.get(fd) is conn:  # delivering may have closed it (forget)
            try:
                msg = conn.sock.recv(_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg or msg[0] not in (_LAST, _MORE):
                self._close(fd)  # the peer closed it, or it is not one of ours
                return
            conn.parts.append(msg[1:])
            if msg[0] == _MORE:
                continue
            notice = b"".join(conn.parts)
            conn.parts.clear()
            if conn.owner is not None:
                yield notice
                continue
            conn.owner = self._expected.pop(notice, None)
            if conn.owner is None:
                self._close(fd)  # an unknown token
                return

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd)
        with contextlib.suppress(KeyError):
            self._poller.unregister(fd)
        conn.sock.close()


def open_channel(address: str, token: bytes) -> _core.NoticeChannel:
    """Connects to a peer's ``NoticeInbox`` at ``address`` and identifies with ``token``."""
    sock = _seqpacket()
    try:
        sock.setblocking(True)
        sock.connect("\0" + address.removeprefix("@"))
        sock.send(bytes([_LAST]) + token)
    except OSError as exc:
        sock.close()
        raise TransferError(f"cannot open the notice socket {address}: {exc}") from exc
    return _core.NoticeChannel(sock.detach())


def setup_bytes(address: str, token: bytes) -> bytes:
    """What one side tells the other at the handshake: its inbox address and a token."""
    return token.hex().encode() + b" " + address.encode()


def parse_setup(setup: bytes) -> tuple[str, bytes]:
    """The (address, token) of ``setup_bytes``; TransferError when malformed."""
    token, _, address = setup.decode(errors="replace").partition(" ")
    try:
        return address, bytes.fromhex(token)
    except ValueError:
        raise TransferError(f"malformed notice-socket setup {setup[:64]!r}") from None
