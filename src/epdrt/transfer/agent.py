# SPDX-License-Identifier: Apache-2.0
"""Transfer agents: one per process; a handshake per peer pair, then block-id transfers.

An agent owns a ZeroMQ ROUTER socket (``ipc://`` abstract address by default, or TCP) that
receives every control message, and one DEALER socket per peer for what it sends. The
handshake (Hello -> Welcome -> Ready) exchanges region descriptors once and picks a transport:

- ``local``: the peer is in this process; its regions are used directly;
- ``ipc``: same host; the peer's regions are mapped (memfd on CPU, CUDA IPC on GPU) and written
  in place by the transfer engine, so the receiver's cache is the destination (zero copy);
- ``nixl``: another host, when the ``nixl`` package is installed (UCX: RDMA, GPUDirect);
- ``dist``: another host without NIXL: a two-rank torch.distributed group per peer pair
  (gloo on CPU, NCCL on GPUs), staged through a contiguous buffer on both sides.

After a transfer's bytes have landed, the receiver gets a :class:`Notice` (key, destination
block ids); ``Peer.recv(key)`` returns it. A peer that exits is noticed through the socket
monitor (the kernel closes its connections; ZMTP heartbeats cover silent hosts): every wait on
it then raises TransferError instead of hanging, and its mapped regions are released.

NOTE: an agent is single-threaded, like the caches: progress (sending the notice of a finished
copy, answering a handshake, receiving) happens inside the agent's calls (``poll``, waits,
sends). A listener must be inside one of them (e.g. ``accept``) for a handshake to complete.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from epdrt.errors import InvalidArgument, TransferError
from epdrt.region import Region
from epdrt.transfer import links
from epdrt.transfer import messages as m
from epdrt.transfer.engine import TransferEngine, _int64_array
from epdrt.transfer.notices import NoticeInbox

TRANSPORTS = ("auto", "local", "ipc", "nixl", "dist")

# Agents of this process by name: the "local" transport uses a peer's regions directly.
_LOCAL_AGENTS: weakref.WeakValueDictionary[str, TransferAgent] = weakref.WeakValueDictionary()

# Longest a pump sleeps without looking at pending work, as a guard against missed wakeups.
_MAX_SLICE_S = 0.05
# Poll interval while a transport without a wakeup fd (nixl) has work in flight; dist waits
# signal the agent's Wakeup eventfd instead.
_POLL_SLICE_S = 0.001
#: How long a wait polls same-host notice sockets (and NIXL) before it sleeps (``spin_s``).
DEFAULT_SPIN_S = 100e-6


@atexit.register
def _close_all_agents() -> None:
    """Says goodbye to peers and stops transport threads before the interpreter goes away."""
    for agent in list(_LOCAL_AGENTS.values()):
        with contextlib.suppress(Exception):
            agent.close()


def host_identity() -> str:
    """Hostname plus boot id: equal for two processes exactly when they share a kernel."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


#: Where NIXL's Python API lives: the ``nixl`` package (which picks a backend wheel by the
#: host's CUDA), or a backend wheel alone (``epdrt[nixl]`` installs ``nixl-cu12``, which runs
#: on CPU-only hosts over UCX).
NIXL_API_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")


def nixl_api():
    """NIXL's Python API module (``nixl_agent``, ``nixl_agent_config``, ...)."""
    missing = []
    for name in NIXL_API_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name}: {exc}")
    raise ImportError("NIXL is not installed (pip install epdrt[nixl]): " + "; ".join(missing))


def nixl_available() -> bool:
    """True when NIXL's Python API imports (the cross-node transport of choice)."""
    try:
        nixl_api()
    except Exception:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Wakeup:
    """An eventfd that threads other than the agent's signal to end its poll early.

    ``signal`` after ``close`` does nothing, so a transport thread that outlives the agent never
    writes to a closed (or reused) descriptor.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def signal(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


class _LocalRegion(msgspec.Struct):
    region: Region
    info: m.RegionInfo


class SendHandle:
    """One outgoing transfer: done when the bytes have landed and the notice is on its way.

    ``wait`` raises TransferError when the copy failed or the peer went away first.
    """

    def __init__(self, peer: Peer, notice: m.Notice) -> None:
        self.peer = peer
        self.notice = notice
        self._done = False
        self._error: str | None = None
        self._callbacks: list[Callable[[SendHandle], None]] = []

    @property
    def key(self) -> str:
        return self.notice.key

    @property
    def nbytes(self) -> int:
        return self.notice.nbytes

    def done(self) -> bool:
        """Makes progress without blocking; True once finished or failed."""
        if not self._done:
            self.peer.agent.poll(0)
        return self._done

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until finished; raises TransferError on failure, TimeoutError on timeout."""
        agent = self.peer.agent
        agent._wait_for(lambda: self._done, timeout, f"sending {self.key!r} to {self.peer.name}")
        if self._error is not None:
            raise TransferError(self._error)

    @property
    def error(self) -> str | None:
        return self._error

    def add_done_callback(self, fn: Callable[[SendHandle], None]) -> None:
        """Calls ``fn(handle)`` once finished (success or failure), from inside the agent."""
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def _finish(self, error: str | None = None) -> None:
        if self._done:
            return
        self._done, self._error = True, error
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed" if self._error else "done")
        return f"SendHandle({self.key!r} part {self.notice.part}, {self.nbytes} B, {state})"


class Peer:
    """The far side of one handshake. Created by :meth:`TransferAgent.connect` / ``accept``."""

    def __init__(
        self,
        agent: TransferAgent,
        hello: m.Hello | m.Welcome,
        transport: str,
        dealer: zmq.Socket,
        monitor: zmq.Socket,
        path: links.LinkPath,
    ) -> None:
        self.agent = agent
        self.name = hello.name
        self.pid = hello.pid
        self.host = hello.host
        self.address = hello.address
        self.transport = transport
        #: how this connection's bytes move (worked out at the handshake)
        self.path = path
        #: transfers written to the peer, and their bytes
        self.transfers = 0
        self.bytes_sent = 0
        #: regions the peer announced, by name
        self.regions: dict[str, m.RegionInfo] = {r.name: r for r in hello.regions}
        self.ready = False
        self.error: str | None = None
        self._dealer = dealer
        self._monitor = monitor
        self._inbox: deque[m.Notice] = deque()  # arrival order
        from epdrt.transfer.backends import make_backend

        self.backend = make_backend(transport, agent, self)

    @property
    def alive(self) -> bool:
        return self.error is None

    # ---- sending ---------------------------------------------------------------------------
    def write(
        self,
        key: str,
        src_region: str,
        dst_region: str,
        src_offsets: Sequence[int] | np.ndarray,
        dst_offsets: Sequence[int] | np.ndarray,
        nbytes: int | Sequence[int] | np.ndarray,
        *,
        blocks: Sequence[int] = (),
        part: int = 0,
        num_parts: int = 1,
        data: bytes = b"",
    ) -> SendHandle:
        """Copies byte ranges of local region ``src_region`` into the peer's ``dst_region``.

        Args:
            key: what the receiver's ``recv(key)`` matches (e.g. a request id).
            src_offsets: ``[n] int64`` byte offsets in the local region.
            dst_offsets: ``[n] int64`` byte offsets in the peer's region.
            nbytes: bytes per range (int) or ``[n] int64``.
            blocks: destination block ids to report in the notice.
            part, num_parts: which piece of ``key`` this is (e.g. a layer).
            data: small opaque bytes for the receiver.

        Returns a handle at once; invalid ranges raise InvalidArgument with nothing sent.
        """
        self._check_usable()
        src = self.agent._local_region(src_region)
        dst = self.regions.get(dst_region)
        if dst is None:
            raise InvalidArgument(f"peer {self.name} has no region {dst_region!r}")
        so = _int64_array("src_offsets", src_offsets)
        do = _int64_array("dst_offsets", dst_offsets)
        sizes: int | np.ndarray  # one size for every range (the common case), or one each
        if isinstance(nbytes, (int, np.integer)):
            sizes = int(nbytes)
            total = sizes * so.shape[0]
            count = so.shape[0]
        else:
            sizes = _int64_array("nbytes", nbytes)
            total, count = int(sizes.sum()), sizes.shape[0]
        if not so.shape[0] == do.shape[0] == count:
            raise InvalidArgument(
                f"src_offsets, dst_offsets and nbytes differ in length: {so.shape[0]},"
                f" {do.shape[0]}, {count}"
            )
        if not self.backend.engine_checks:  # these backends take one size per range
            if isinstance(sizes, int):
                sizes = np.full(so.shape, sizes, dtype=np.int64)
            _check_ranges(so, do, sizes, src.nbytes, dst.nbytes)
        notice = m.Notice(
            key=key, part=part, num_parts=num_parts, region=dst_region,
            blocks=[int(b) for b in blocks], nbytes=total, data=data,
        )  # fmt: skip
        handle = SendHandle(self, notice)
        self.backend.write(handle, src, dst, so, do, sizes)
        self.transfers += 1
        self.bytes_sent += total
        return handle

    def send_blocks(
        self,
        key: str,
        src_region: str,
        src_blocks: Sequence[int] | np.ndarray,
        dst_region: str,
        dst_blocks: Sequence[int] | np.ndarray,
        *,
        offset: int = 0,
        nbytes: int | None = None,
        part: int = 0,
        num_parts: int = 1,
        data: bytes = b"",
    ) -> SendHandle:
        """Copies blocks ``src_blocks[i]`` -> ``dst_blocks[i]`` of two block regions.

        Both regions must have been registered with the same ``block_nbytes`` (and layout).
        ``offset``/``nbytes`` select a piece of every block (default: the whole block), e.g.
        one layer of a paged KV cache.
        """
        local = self.agent._regions.get(src_region)
        if local is None:
            raise InvalidArgument(f"no local region {src_region!r} is registered")
        remote = self.regions.get(dst_region)
        if remote is None:
            raise InvalidArgument(f"peer {self.name} has no region {dst_region!r}")
        block = local.info.block_nbytes
        if block <= 0 or remote.block_nbytes != block:
            raise InvalidArgument(
                f"send_blocks needs block regions of equal block size: {src_region!r} has"
                f" {block} B blocks, the peer's {dst_region!r} {remote.block_nbytes} B"
            )
        if local.info.layout and remote.layout and local.info.layout != remote.layout:
            raise InvalidArgument(
                f"cache layouts differ: {local.info.layout!r} here, {remote.layout!r} at the peer"
            )
        size = block - offset if nbytes is None else nbytes
        if offset < 0 or size <= 0 or offset + size > block:
            raise InvalidArgument(f"bytes [{offset}, {offset + size}) are not inside a block")
        sb = _int64_array("src_blocks", src_blocks)
        db = _int64_array("dst_blocks", dst_blocks)
        if sb.shape != db.shape:
            raise InvalidArgument(f"{sb.shape[0]} source blocks but {db.shape[0]} destination")
        for name, ids, info in (("src", sb, local.info), ("dst", db, remote)):
            limit = info.nbytes // block
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise InvalidArgument(f"{name} block ids must be in [0, {limit})")
        return self.write(
            key, src_region, dst_region, sb * block + offset, db * block + offset, size,
            blocks=db.tolist(), part=part, num_parts=num_parts, data=data,
        )  # fmt: skip

    def notify(self, key: str, *, blocks: Sequence[int] = (), data: bytes = b"") -> None:
        """Sends a notice without data (e.g. the block ids a sender should write to)."""
        self._check_usable()
        self.backend.send_plain(m.Notice(key=key, blocks=[int(b) for b in blocks], data=data))

    # ---- receiving -------------------------------------------------------------------------
    def recv(self, key: str | None = None, timeout: float | None = None) -> m.Notice:
        """The next notice for ``key`` (None: any key) from this peer, waiting up to
        ``timeout`` seconds (None: the agent's default).

        Raises TransferError when the peer is gone (notices that arrived before still come
        out first) and TimeoutError when the time runs out.
        """
        found: list[m.Notice] = []

        def take() -> bool:
            for i, notice in enumerate(self._inbox):
                if key is None or notice.key == key:
                    del self._inbox[i]
                    found.append(notice)
                    return True
            return not self.alive

        self.agent._wait_for(take, timeout, f"waiting for {key or 'a notice'!r} from {self.name}")
        if found:
            return found[0]
        raise TransferError(f"peer {self.name} (pid {self.pid}): {self.error}")

    def pending_keys(self) -> list[str]:
        """Keys of the notices waiting to be received, in arrival order."""
        return [n.key for n in self._inbox]

    def close(self, reason: str = "closed") -> None:
        """Says goodbye and releases everything opened for this peer."""
        if self.alive:
            with contextlib.suppress(TransferError):
                self._send(m.Bye(reason=reason))
        self.agent._drop_peer(self, f"closed here ({reason})", notify=False)

    # ---- internals -------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if not self.alive:
            raise TransferError(f"peer {self.name} (pid {self.pid}): {self.error}")

    def _send(self, msg: m.Message) -> None:
        try:
            self._dealer.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise TransferError(f"cannot send to peer {self.name}: {exc}") from exc

    def _deliver(self, notice: m.Notice) -> None:
        self._inbox.append(notice)

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"gone: {self.error}"
        return f"Peer({self.name!r}, pid={self.pid}, transport={self.transport}, {state})"


def _check_ranges(
    so: np.ndarray, do: np.ndarray, sizes: np.ndarray, src_nbytes: int, dst_nbytes: int
) -> None:
    """The transfer engine's checks, for transports that do not go through it."""
    if not so.size:
        return
    if int(so.min()) < 0 or int(do.min()) < 0 or int(sizes.min()) < 0:
        raise InvalidArgument("offsets and sizes must be non-negative")
    if int((so + sizes).max()) > src_nbytes:
        raise InvalidArgument(f"source ranges go past the region's {src_nbytes} bytes")
    if int((do + sizes).max()) > dst_nbytes:
        raise InvalidArgument(f"destination ranges go past the region's {dst_nbytes} bytes")
    order = np.argsort(do, kind="stable")
    ends = (do + sizes)[order]
    if so.size > 1 and bool((do[order][1:] < ends[:-1]).any()):
        raise InvalidArgument("destination ranges overlap")


class TransferAgent:
    """This process's end of every transfer connection.

    Args:
        name: unique among the agents that talk to each other (default: host-pid-random).
        address: where to listen: ``ipc://@name`` (Linux abstract socket, the default: no file
            to leak), ``ipc:///path`` or ``tcp://host:port`` (port ``*`` picks a free one).
        engine: the transfer engine for local copies (default: a new one).
        timeout: default seconds for every wait whose timeout is None.
        dist_host: address the peers of the ``dist`` transport reach this host at (default:
            the TCP host of ``address``, else 127.0.0.1).
        heartbeat_s: ZMTP heartbeat interval on TCP connections; a peer silent for three
            intervals is treated as gone.
        spin_s: a wait first polls the notice sockets of same-host peers, and NIXL, without
            sleeping for up to this many seconds (a core busy meanwhile; 0: sleep at once).
            Waking a sleeping process costs 20-40 us on a VM, more than a small copy.
        strict: refuse a connection whose bytes would take a slower path than the placement
            allows without being asked to (``transfer.links``: e.g. NIXL falling back to TCP);
            without it such a connection is a logged warning.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        address: str | None = None,
        engine: TransferEngine | None = None,
        timeout: float = 60.0,
        dist_host: str | None = None,
        heartbeat_s: float = 1.0,
        spin_s: float = DEFAULT_SPIN_S,
        strict: bool = False,
    ) -> None:
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        if self.name in _LOCAL_AGENTS:
            raise InvalidArgument(f"an agent named {self.name!r} already exists in this process")
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s
        if not spin_s >= 0:
            raise InvalidArgument(f"spin_s must be >= 0, got {spin_s}")
        self.spin_s = spin_s
        self.strict = strict
        self.engine = engine if engine is not None else TransferEngine()
        self.host = host_identity()
        self.pid = os.getpid()
        self._ctx = zmq.Context.instance()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 0)
        self._router.bind(address or f"ipc://@epdrt-{self.name}")
        self.address: str = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if dist_host is None:
            dist_host = "127.0.0.1"
            if self.address.startswith("tcp://"):
                host = self.address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
                if host not in ("0.0.0.0", "*", "::"):
                    dist_host = host
        self.dist_host = dist_host
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self.engine.completion_fd, zmq.POLLIN)
        #: signalled by transport threads (torch.distributed waits) when work completes
        self.wakeup = Wakeup()
        self._poller.register(self.wakeup.fd, zmq.POLLIN)
        #: where same-host peers' notices arrive (``local`` and ``ipc`` transports)
        self.notice_inbox = NoticeInbox(self.name, self._poller)
        self._regions: dict[str, _LocalRegion] = {}
        self._peers: dict[str, Peer] = {}
        self._by_monitor: dict[zmq.Socket, Peer] = {}
        self._connecting: dict[str, m.Welcome | None] = {}  # token -> Welcome once it arrives
        self._accepted: deque[Peer] = deque()
        self._half_open: dict[str, Peer] = {}  # listener side: Welcome sent, Ready not yet in
        self._nixl: Any = None  # transfer.backends.NixlContext, created on first use
        self._closed = False
        # Held while pumping. An agent of this process that waits on this one (a same-process
        # handshake) pumps it too when no other thread is inside it.
        self._pump_lock = threading.Lock()
        _LOCAL_AGENTS[self.name] = self

    # ---- regions ---------------------------------------------------------------------------
    def register(
        self, name: str, region: Region, *, block_nbytes: int = 0, layout: str = ""
    ) -> None:
        """Makes ``region`` writable by peers as ``name`` (before connecting to them).

        ``block_nbytes`` > 0 makes it a block region for ``send_blocks``; ``layout`` is checked
        against the peer's for block sends (see ``epdrt.transfer.caches``).
        """
        if self._peers or self._half_open:
            raise InvalidArgument(
                "register regions before connecting: peers learn them at the handshake"
            )
        if name in self._regions:
            raise InvalidArgument(f"a region named {name!r} is already registered")
        if block_nbytes < 0 or (block_nbytes and region.nbytes < block_nbytes):
            raise InvalidArgument(f"bad block_nbytes {block_nbytes} for a {region.nbytes} B region")
        info = m.RegionInfo(
            name=name, descriptor=region.export(), nbytes=region.nbytes, device=str(region.device),
            address=region.data_ptr, block_nbytes=block_nbytes, layout=layout,
        )  # fmt: skip
        self._regions[name] = _LocalRegion(region, info)

    def region(self, name: str) -> Region:
        return self._local_region(name)

    def _local_region(self, name: str) -> Region:
        local = self._regions.get(name)
        if local is None:
            raise InvalidArgument(f"no local region {name!r} is registered")
        return local.region

    # ---- connections -----------------------------------------------------------------------
    @property
    def peers(self) -> dict[str, Peer]:
        """Connected peers by name (including ones that have gone away)."""
        return dict(self._peers)

    def connect(
        self, address: str, *, transport: str = "auto", timeout: float | None = None
    ) -> Peer:
        """Handshakes with the agent listening at ``address``; returns the connected peer.

        ``transport``: "auto" (chosen by where the peer is) or one of local/ipc/nixl/dist. The
        other agent must be inside one of its calls (e.g. ``accept``) to answer.
        """
        self._check_open()
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        token = secrets.token_hex(8)
        dealer, monitor = self._dealer(address)
        self._connecting[token] = None
        listener = next((a for a in _LOCAL_AGENTS.values() if a.address == address), None)
        hello = m.Hello(
            name=self.name, pid=self.pid, host=self.host, address=self.address,
            transport=f"{transport}/{token}", regions=[r.info for r in self._regions.values()],
        )  # fmt: skip
        try:
            dealer.send(m.encode(hello), zmq.NOBLOCK)
            self._wait_for(
                lambda: self._connecting[token] is not None,
                timeout,
                f"connecting to {address}",
                also=listener,
            )
        except BaseException:
            self._connecting.pop(token, None)
            self._close_sockets(dealer, monitor)
            raise
        welcome = self._connecting.pop(token)
        assert welcome is not None
        if welcome.error:
            self._close_sockets(dealer, monitor)
            raise TransferError(f"{address} refused the connection: {welcome.error}")
        path = self._link_path(welcome.transport, transport, welcome.host)
        if self.strict and path.slow:
            with contextlib.suppress(zmq.ZMQError):
                dealer.send(m.encode(m.Ready(error=f"refused by a strict agent: {path.slow}")))
            self._close_sockets(dealer, monitor, linger_ms=200)
            raise TransferError(f"strict: {welcome.name} would be reached over {path.slow}")
        links.report(path, welcome.name)
        peer = Peer(self, welcome, welcome.transport, dealer, monitor, path)
        self._add_peer(peer)
        try:
            setup = peer.backend.connector_setup(welcome.setup, self._timeout(timeout))
        except Exception as exc:
            peer._send(m.Ready(error=f"{type(exc).__name__}: {exc}"))
            self._drop_peer(peer, f"transport setup failed: {exc}", notify=False)
            raise TransferError(f"{peer.transport} setup with {peer.name} failed: {exc}") from exc
        peer._send(m.Ready(setup=setup))
        peer.ready = True
        return peer

    def accept(self, timeout: float | None = None) -> Peer:
        """Waits for the next peer to connect and finish the handshake."""
        self._check_open()
        self._wait_for(lambda: bool(self._accepted), timeout, "waiting for a peer to connect")
        return self._accepted.popleft()

    def peer(self, name: str) -> Peer:
        return self._peers[name]

    # ---- progress --------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> None:
        """Handles whatever arrived and advances transfers; waits up to ``timeout`` seconds."""
        self._check_open()
        self._pump(timeout)

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _wait_for(
        self,
        cond: Callable[[], bool],
        timeout: float | None,
        what: str,
        also: TransferAgent | None = None,
    ) -> None:
        """Pumps until ``cond()``; ``also`` (an agent of this process) is pumped alongside.

        ``cond`` may act when it holds (take a notice): it is not called again once true.
        """
        self._check_open()
        if cond():
            return
        limit = self._timeout(timeout)
        deadline = time.monotonic() + limit
        self._pump(0)
        if cond() or (self.spin_s > 0 and self._spin(cond, min(self.spin_s, limit))):
            return
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: {what}: no result after {limit} s")
            if also is not None and not also._closed and also._pump_lock.acquire(blocking=False):
                try:
                    also._pump_locked(0)
                finally:
                    also._pump_lock.release()
                left = min(left, _POLL_SLICE_S)
            self._pump(left)
            if cond():
                return

    def _spin(self, cond: Callable[[], bool], seconds: float) -> bool:
        """Reads the notice sockets and polls the transports that need it (NIXL) without
        sleeping until ``cond()`` (True) or ``seconds`` pass (False): waking a sleeping
        process costs tens of microseconds on a VM, more than a small copy (NIXL's UCX
        progress polls the same way)."""
        polled = self.notice_inbox.connected or self._needs_polling()
        if not polled or not self._pump_lock.acquire(blocking=False):
            return False
        try:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                self.notice_inbox.drain(self._on_channel_notice, accept=False)
                self._progress()
                if cond():
                    return True
            return False
        finally:
            self._pump_lock.release()

    def _pump(self, timeout: float) -> None:
        with self._pump_lock:
            self._pump_locked(timeout)

    def _pump_locked(self, timeout: float) -> None:
        slice_s = min(timeout, _POLL_SLICE_S if self._needs_polling() else _MAX_SLICE_S)
        ready = dict(self._poller.poll(math.ceil(max(0.0, slice_s) * 1000)))
        # Notices first: those a peer sent before its Bye are read before the Bye drops it.
        if self._router in ready or any(self.notice_inbox.owns(fd) for fd in ready):
            self.notice_inbox.drain(self._on_channel_notice)
        if self._router in ready:
            self._drain_router()
        if self.engine.completion_fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.engine.completion_fd, 8)
        if self.wakeup.fd in ready:
            self.wakeup.drain()
        for sock in [s for s in ready if isinstance(s, zmq.Socket) and s in self._by_monitor]:
            self._handle_monitor(sock)
        self._progress()

    def _needs_polling(self) -> bool:
        return any(p.backend.needs_polling() for p in self._peers.values() if p.alive)

    def _progress(self) -> None:
        if self._nixl is not None:
            self._nixl.poll_notifications()
        for peer in list(self._peers.values()):
            if peer.alive:
                try:
                    peer.backend.progress()
                except TransferError as exc:
                    self._drop_peer(peer, str(exc), notify=True)

    def _drain_router(self) -> None:
        while True:
            try:
                ident, frame = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of ours
                continue
            sender = ident.decode(errors="replace")
            try:
                msg = m.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                peer = self._peers.get(sender)
                if peer is not None and peer.alive:
                    self._drop_peer(peer, f"sent a malformed message ({exc})", notify=True)
                continue
            self._dispatch(sender, msg)

    def _dispatch(self, sender: str, msg: m.Message) -> None:
        if isinstance(msg, m.Hello):
            self._on_hello(msg)
            return
        if isinstance(msg, m.Welcome):
            token = msg.transport.partition("/")[2]
            if token in self._connecting:
                self._connecting[token] = msgspec.structs.replace(
                    msg, transport=msg.transport.partition("/")[0]
                )
            return
        peer = self._peers.get(sender)
        if peer is None or not peer.alive:
            return  # a late message of a peer already dropped
        if isinstance(msg, m.Ready):
            self._half_open.pop(sender, None)
            if msg.error:
                self._drop_peer(peer, f"the peer's transport setup failed: {msg.error}", False)
                return
            try:
                peer.backend.listener_finish(msg.setup)
            except Exception as exc:
                self._drop_peer(peer, f"transport setup failed: {exc}", notify=True)
                return
            peer.ready = True
            self._accepted.append(peer)
        elif isinstance(msg, m.Notice):
            self._on_notice(peer, msg)
        elif isinstance(msg, m.Bye):
            self._drop_peer(peer, f"the peer closed the connection ({msg.reason})", notify=False)

    def _on_notice(self, peer: Peer, notice: m.Notice) -> None:
        try:
            if peer.backend.on_notice(notice):
                peer._deliver(notice)
        except TransferError as exc:
            self._drop_peer(peer, str(exc), notify=True)

    def _on_channel_notice(self, peer: object, raw: bytes) -> None:
        """A notice from a same-host peer's notice socket."""
        assert isinstance(peer, Peer)
        try:
            msg = m.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if peer.alive:
                self._drop_peer(peer, f"sent a malformed notice ({exc})", notify=True)
            return
        if isinstance(msg, m.Notice) and peer.alive:
            self._on_notice(peer, msg)

    def _on_hello(self, hello: m.Hello) -> None:
        requested, _, token = hello.transport.partition("/")
        dealer, monitor = self._dealer(hello.address)

        def refuse(error: str) -> None:
            welcome = m.Welcome(
                name=self.name, pid=self.pid, host=self.host, address=self.address,
                transport=f"{requested}/{token}", regions=[], error=error,
            )  # fmt: skip
            with contextlib.suppress(zmq.ZMQError):
                dealer.send(m.encode(welcome), zmq.NOBLOCK)
            self._close_sockets(dealer, monitor, linger_ms=200)

        old = self._peers.get(hello.name)
        if old is not None and old.alive:
            refuse(f"an agent named {hello.name!r} is already connected")
            return
        try:
            transport = self._choose_transport(requested, hello)
        except InvalidArgument as exc:
            refuse(str(exc))
            return
        path = self._link_path(transport, requested, hello.host)
        if self.strict and path.slow:
            refuse(f"refused by a strict agent: {path.slow}")
            return
        links.report(path, hello.name)
        peer = Peer(self, hello, transport, dealer, monitor, path)
        try:
            setup = peer.backend.listener_setup()
        except Exception as exc:
            peer.backend.close()
            refuse(f"{transport} setup failed: {type(exc).__name__}: {exc}")
            return
        self._add_peer(peer)
        self._half_open[peer.name] = peer
        welcome = m.Welcome(
            name=self.name, pid=self.pid, host=self.host, address=self.address,
            transport=f"{transport}/{token}", regions=[r.info for r in self._regions.values()],
            setup=setup,
        )  # fmt: skip
        peer._send(welcome)
        try:
            peer.backend.listener_connect(self.timeout)
        except Exception as exc:
            self._drop_peer(peer, f"transport setup failed: {exc}", notify=False)

    def _link_path(self, transport: str, requested: str, host: str) -> links.LinkPath:
        devices = {r.info.device for r in self._regions.values()}
        device = next((d for d in devices if d.startswith("cuda")), "cpu")
        return links.describe(transport, requested, host == self.host, device)

    def links(self) -> list[dict[str, object]]:
        """Every connection: its peer, transport, path, and what was written to it."""
        return [
            {
                "peer": p.name, "transport": p.transport, "path": p.path.detail,
                "slow": p.path.slow, "alive": p.alive, "transfers": p.transfers,
                "bytes_sent": p.bytes_sent,
            }
            for p in self._peers.values()
        ]  # fmt: skip

    def _choose_transport(self, requested: str, hello: m.Hello) -> str:
        same_host = hello.host == self.host
        same_process = same_host and hello.pid == self.pid
        if requested == "auto":
            if same_process:
                return "local"
            if same_host:
                return "ipc"
            return "nixl" if nixl_available() else "dist"
        if requested == "local" and not same_process:
            raise InvalidArgument("the local transport needs both agents in one process")
        if requested == "ipc" and not same_host:
            raise InvalidArgument("the ipc transport needs both agents on one host")
        if requested == "nixl" and not nixl_available():
            raise InvalidArgument("the nixl package is not installed at the listener")
        if requested not in TRANSPORTS:
            raise InvalidArgument(f"unknown transport {requested!r}")
        return requested

    def _dealer(self, address: str) -> tuple[zmq.Socket, zmq.Socket]:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self.name.encode())
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 0)
        ivl = max(1, int(self.heartbeat_s * 1000))
        dealer.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
        dealer.setsockopt(zmq.HEARTBEAT_TTL, 3 * ivl)
        monitor = dealer.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        dealer.connect(address)
        return dealer, monitor

    def _add_peer(self, peer: Peer) -> None:
        self._peers[peer.name] = peer
        self._by_monitor[peer._monitor] = peer
        self._poller.register(peer._monitor, zmq.POLLIN)

    def _handle_monitor(self, sock: zmq.Socket) -> None:
        peer = self._by_monitor.get(sock)
        while True:
            try:
                event = parse_monitor_message(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if peer is not None and peer.alive and event["event"] == zmq.EVENT_DISCONNECTED:
                why = "its connection closed"
                if peer.host == self.host and not _pid_alive(peer.pid):
                    why = f"process {peer.pid} exited"
                self._drop_peer(peer, f"peer lost: {why}", notify=False)
                return

    def _drop_peer(self, peer: Peer, reason: str, notify: bool) -> None:
        """Marks ``peer`` gone: its pending work fails, its sockets and regions are released."""
        if not peer.alive:
            return
        peer.error = reason
        if notify:
            with contextlib.suppress(TransferError):
                peer._send(m.Bye(reason=reason))
        peer.backend.fail_all(f"peer {peer.name} (pid {peer.pid}): {reason}")
        peer.backend.close()
        self._half_open.pop(peer.name, None)
        self._by_monitor.pop(peer._monitor, None)
        self._poller.unregister(peer._monitor)
        self._close_sockets(peer._dealer, peer._monitor, linger_ms=100 if notify else 0)

    def _close_sockets(self, dealer: zmq.Socket, monitor: zmq.Socket, linger_ms: int = 0) -> None:
        with contextlib.suppress(zmq.ZMQError):
            dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=linger_ms)

    # ---- teardown --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"agent {self.name} is closed")

    def close(self) -> None:
        """Says goodbye to every peer and releases sockets, mapped regions and transports."""
        if self._closed:
            return
        for peer in list(self._peers.values()):
            if peer.alive:
                peer.close("agent closed")
        if self._nixl is not None:
            self._nixl.close()
            self._nixl = None
        self.notice_inbox.close()
        self._router.close(linger=0)
        self._poller.unregister(self.wakeup.fd)
        self.wakeup.close()
        self._closed = True
        if _LOCAL_AGENTS.get(self.name) is self:
            del _LOCAL_AGENTS[self.name]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TransferAgent({self.name!r}, {self.address}, peers={len(self._peers)})"
