# SPDX-License-Identifier: Apache-2.0
"""Transport backends behind :class:`~epdrt.transfer.agent.Peer`: local, ipc, nixl, dist.

Every backend moves byte ranges of a local region into a peer's region and makes sure the
peer receives the transfer's :class:`~epdrt.transfer.messages.Notice` only after the bytes have
landed. The agent drives them: handshake hooks, ``write``, then ``progress`` on every pump.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import torch

from epdrt.device import as_device
from epdrt.errors import InvalidArgument, TransferError
from epdrt.region import Region
from epdrt.transfer import messages as m
from epdrt.transfer import notices
from epdrt.transfer.engine import Transfer

if TYPE_CHECKING:
    from epdrt.transfer.agent import Peer, SendHandle, TransferAgent

# Objects that may still be used by a transport's threads after their peer died (a pending
# torch.distributed work and its buffer, a NIXL request): kept until the process exits rather
# than freed under a running copy.
_GRAVEYARD: list[Any] = []


class Backend:
    """Interface of a transport. One instance per peer."""

    name = ""
    #: True when ``write`` goes through the TransferEngine, which validates the ranges itself.
    engine_checks = False

    def __init__(self, agent: TransferAgent, peer: Peer) -> None:
        self.agent = agent
        self.peer = peer

    # Handshake: the listener computes its setup bytes (sent in Welcome), then may block to
    # connect; the connector gets them and answers with its own (sent in Ready).
    def listener_setup(self) -> bytes:
        return b""

    def listener_connect(self, timeout: float) -> None:
        pass

    def connector_setup(self, setup: bytes, timeout: float) -> bytes:
        return b""

    def listener_finish(self, setup: bytes) -> None:
        pass

    def write(
        self,
        handle: SendHandle,
        src: Region,
        dst: m.RegionInfo,
        src_offsets: np.ndarray,
        dst_offsets: np.ndarray,
        sizes: np.ndarray,
    ) -> None:
        raise NotImplementedError

    def progress(self) -> None:
        """Advances pending work; raises TransferError when the peer is unusable."""

    def needs_polling(self) -> bool:
        """True while work is in flight whose completion wakes no file descriptor."""
        return False

    def on_notice(self, notice: m.Notice) -> bool:
        """A notice arrived; True to hand it to the receiver now, False when delivered later."""
        return True

    def send_plain(self, notice: m.Notice) -> None:
        """Sends a notice without data, ordered after the notices of earlier transfers."""
        self.peer._send(notice)

    def fail_all(self, reason: str) -> None:
        """Fails every pending send with ``reason`` (the peer is gone)."""

    def close(self) -> None:
        """Releases what this backend opened for the peer."""


def make_backend(transport: str, agent: TransferAgent, peer: Peer) -> Backend:
    classes: dict[str, type[Backend]] = {
        "local": LocalBackend,
        "ipc": IpcBackend,
        "nixl": NixlBackend,
        "dist": DistBackend,
    }
    if transport not in classes:
        raise InvalidArgument(f"unknown transport {transport!r}")
    return classes[transport](agent, peer)


# ---- same process / same host: the transfer engine writes into the peer's region ----------


class _EngineBackend(Backend):
    """Same host: the transfer engine writes into the peer's region, and each notice goes
    over the peer's notice socket (``transfer.notices``) from the thread that finishes its
    copy, in submission order."""

    engine_checks = True

    def __init__(self, agent: TransferAgent, peer: Peer) -> None:
        super().__init__(agent, peer)
        self._remote: dict[str, Region] = {}
        self._channel: Any = None  # _core.NoticeChannel to the peer, once the handshake ends
        # Sends not finished yet, in submission order: (handle, transfer, notices posted by
        # then: the channel has retired the handle's notice once it sent or dropped that many).
        self._pending: deque[tuple[SendHandle, Any, int]] = deque()
        self._posted = 0
        # One CUDA stream per peer: a random key shared by all of this peer's transfers.
        self._stream_key = secrets.randbits(62) + 1

    def _open(self, info: m.RegionInfo) -> Region:
        raise NotImplementedError

    def _open_all(self) -> None:
        for name, info in self.peer.regions.items():
            self._remote[name] = self._open(info)

    def _inbox_setup(self) -> bytes:
        inbox = self.agent.notice_inbox
        return notices.setup_bytes(inbox.address, inbox.expect(self.peer))

    def listener_setup(self) -> bytes:
        self._open_all()
        return self._inbox_setup()

    def connector_setup(self, setup: bytes, timeout: float) -> bytes:
        self._open_all()
        self._channel = notices.open_channel(*notices.parse_setup(setup))
        return self._inbox_setup()

    def listener_finish(self, setup: bytes) -> None:
        self._channel = notices.open_channel(*notices.parse_setup(setup))

    def _post(self, transfer: Any, notice: m.Notice) -> None:
        try:
            self._channel.post(transfer, m.encode(notice))
        except TransferError as exc:
            raise TransferError(f"cannot notify {self.peer.name}: {exc}") from exc
        self._posted += 1

    def write(self, handle, src, dst, src_offsets, dst_offsets, sizes) -> None:
        transfer = self.agent.engine.submit_blocks(
            src, self._remote[dst.name], src_offsets, dst_offsets, sizes, peer=self._stream_key
        )
        self._post(transfer._handle, handle.notice)
        if transfer.done() and not self._channel.pending:  # copied inline, notice sent
            self._settle(handle, transfer)
        else:
            self._pending.append((handle, transfer, self._posted))

    def _settle(self, handle: SendHandle, transfer: Transfer) -> None:
        """Finishes ``handle`` as its finished copy went (its notice is sent or dropped)."""
        transfer.release()
        if transfer.state == "failed":
            handle._finish(f"copy to {self.peer.name} failed: {transfer.error}")
        else:
            handle._finish()

    def send_plain(self, notice: m.Notice) -> None:
        self._post(None, notice)

    def needs_polling(self) -> bool:
        # Notices held back by a full socket, or by CUDA copies (whose end no fd signals).
        return self._channel is not None and self._channel.pending > 0

    def progress(self) -> None:
        channel = self._channel
        if channel is None or (not self._pending and not channel.pending):
            return
        channel.flush()
        if channel.error:
            raise TransferError(f"notices to {self.peer.name}: {channel.error}")
        retired = channel.notices_sent + channel.notices_dropped
        while self._pending:
            handle, transfer, seq = self._pending[0]
            if not transfer.done() or retired < seq:
                return
            self._pending.popleft()
            self._settle(handle, transfer)

    def fail_all(self, reason: str) -> None:
        # The engine still holds the regions of unfinished copies, so dropping ours is safe.
        pending, self._pending = self._pending, deque()
        for handle, _, _ in pending:
            handle._finish(reason)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self.agent.notice_inbox.forget(self.peer)
        self._remote.clear()


class LocalBackend(_EngineBackend):
    """The peer is an agent of this process: its Region objects are used as they are."""

    name = "local"

    def _open(self, info: m.RegionInfo) -> Region:
        from epdrt.transfer.agent import _LOCAL_AGENTS

        other = _LOCAL_AGENTS.get(self.peer.name)
        local = None if other is None else other._regions.get(info.name)
        if local is not None:
            return local.region
        return Region.open(info.descriptor)


class IpcBackend(_EngineBackend):
    """Same host: the peer's regions are mapped here (memfd on CPU, CUDA IPC on GPUs)."""

    name = "ipc"

    def _open(self, info: m.RegionInfo) -> Region:
        return Region.open(info.descriptor)


# ---- cross node: NIXL ----------------------------------------------------------------------


def _coalesce(
    src: np.ndarray, dst: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merges ranges that continue each other in source and destination (after sorting)."""
    keep = sizes > 0
    src, dst, sizes = src[keep], dst[keep], sizes[keep]
    if src.size <= 1:
        return src, dst, sizes
    order = np.argsort(dst, kind="stable")
    src, dst, sizes = src[order], dst[order], sizes[order]
    starts = np.ones(src.size, dtype=bool)
    starts[1:] = (src[1:] != src[:-1] + sizes[:-1]) | (dst[1:] != dst[:-1] + sizes[:-1])
    idx = np.flatnonzero(starts)
    return src[idx], dst[idx], np.add.reduceat(sizes, idx)


class NixlContext:
    """This agent's NIXL agent (UCX backend) with every registered region registered."""

    def __init__(self, agent: TransferAgent) -> None:
        from epdrt.transfer.agent import nixl_api

        api = nixl_api()
        self.nixl = api.nixl_agent(agent.name, api.nixl_agent_config(backends=["UCX"]))
        self._registered = []
        for local in agent._regions.values():
            r = local.region
            descs = self.nixl.register_memory(
                [(r.data_ptr, r.nbytes, r.device.index, "")], mem_type=_mem_type(str(r.device))
            )
            self._registered.append(descs)
        self._peers: dict[str, Peer] = {}

    def metadata(self) -> bytes:
        return self.nixl.get_agent_metadata()

    def add_peer(self, peer: Peer, metadata: bytes) -> str:
        name = self.nixl.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._peers[name] = peer
        return name

    def remove_peer(self, name: str) -> None:
        self._peers.pop(name, None)
        with contextlib.suppress(Exception):  # the remote may already be unreachable
            self.nixl.remove_remote_agent(name)

    def poll_notifications(self) -> None:
        if not self._peers:
            return
        for remote, msgs in self.nixl.get_new_notifs().items():
            name = remote.decode() if isinstance(remote, bytes) else str(remote)
            peer = self._peers.get(name)
            if peer is None or not peer.alive:
                continue
            for raw in msgs:
                try:
                    notice = m.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if isinstance(notice, m.Notice):
                    peer._deliver(notice)

    def close(self) -> None:
        for descs in self._registered:
            with contextlib.suppress(Exception):
                self.nixl.deregister_memory(descs)
        self._registered.clear()


def _mem_type(device: str) -> str:
    return "VRAM" if device.startswith("cuda") else "DRAM"


class NixlBackend(Backend):
    """Another host, through NIXL (UCX): one-sided writes, the notice as a NIXL notification
    (which NIXL delivers only after the written bytes)."""

    name = "nixl"

    def __init__(self, agent: TransferAgent, peer: Peer) -> None:
        super().__init__(agent, peer)
        if agent._nixl is None:
            agent._nixl = NixlContext(agent)
        self.ctx: NixlContext = agent._nixl
        self._remote_name = ""
        self._pending: list[tuple[SendHandle, Any]] = []

    def listener_setup(self) -> bytes:
        return self.ctx.metadata()

    def listener_finish(self, setup: bytes) -> None:
        self._remote_name = self.ctx.add_peer(self.peer, setup)

    def connector_setup(self, setup: bytes, timeout: float) -> bytes:
        self._remote_name = self.ctx.add_peer(self.peer, setup)
        return self.ctx.metadata()

    def write(self, handle, src, dst, src_offsets, dst_offsets, sizes) -> None:
        s, d, n = _coalesce(src.data_ptr + src_offsets, dst.address + dst_offsets, sizes)
        if n.size == 0:
            self.send_plain(handle.notice)
            handle._finish()
            return
        nx = self.ctx.nixl
        src_dev = src.device.index
        dst_dev = as_device(dst.device).index
        local = np.stack([s, n, np.full_like(n, src_dev)], axis=1).astype(np.uint64)
        remote = np.stack([d, n, np.full_like(n, dst_dev)], axis=1).astype(np.uint64)
        with self._errors("could not post a write"):
            req = nx.initialize_xfer(
                "WRITE",
                nx.get_xfer_descs(local, _mem_type(str(src.device))),
                nx.get_xfer_descs(remote, _mem_type(dst.device)),
                self._remote_name,
                m.encode(handle.notice),
            )
            posted = nx.transfer(req)
        if posted == "ERR":
            nx.release_xfer_handle(req)
            raise TransferError(f"NIXL could not post a write to {self.peer.name}")
        self._pending.append((handle, req))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """NIXL's own exceptions (a remote that disconnected, ...) as TransferError."""
        try:
            yield
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(
                f"NIXL {what} to {self.peer.name}: {type(exc).__name__}: {exc}"
            ) from exc

    def progress(self) -> None:
        nx = self.ctx.nixl
        still = []
        for handle, req in self._pending:
            try:
                state = nx.check_xfer_state(req)
            except Exception as exc:  # e.g. the remote disconnected: this write failed
                state = f"{type(exc).__name__}: {exc}"
            if state == "PROC":
                still.append((handle, req))
                continue
            with contextlib.suppress(Exception):
                nx.release_xfer_handle(req)
            error = f"NIXL write to {self.peer.name} failed ({state})"
            handle._finish(None if state == "DONE" else error)
        self._pending = still

    def needs_polling(self) -> bool:
        return True  # completions and notifications are polled

    def send_plain(self, notice: m.Notice) -> None:
        # Through NIXL too, so that it stays behind the notifications of earlier writes.
        with self._errors("could not send a notice"):
            self.ctx.nixl.send_notif(self._remote_name, m.encode(notice))

    def fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, []
        for handle, req in pending:
            _GRAVEYARD.append(req)
            handle._finish(reason)

    def close(self) -> None:
        if self._remote_name:
            self.ctx.remove_peer(self._remote_name)
            self._remote_name = ""


# ---- cross node fallback: torch.distributed ------------------------------------------------


class _DistSetup(msgspec.Struct, frozen=True):
    host: str
    port: int
    backend: str  # "gloo" or "nccl"


@dataclass
class _Waited:
    """A torch.distributed work handed to a _Waiter: ``done`` once ``wait()`` returned."""

    work: Any
    done: bool = False
    error: str | None = None


class _Waiter:
    """A daemon thread that calls ``wait()`` on works in order.

    NOTE: gloo's send/recv works only complete inside ``wait()`` (``is_completed`` stays
    False otherwise), and a wait with a timeout may leave the pair unusable; so one thread per
    peer and direction blocks in ``wait()`` (GIL released), sets the work's ``done`` flag and
    then calls ``wake`` (the agent's wakeup eventfd), so the agent's poll ends at once instead
    of at its next polling slice. A dead peer makes the wait raise; a stuck one leaves only
    this daemon thread behind.
    """

    #: seconds ``stop`` waits for the thread; a wait stuck on a dead peer is left behind
    join_timeout_s = 2.0

    def __init__(self, name: str, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._queue: queue.SimpleQueue[_Waited | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, work: Any) -> _Waited:
        waited = _Waited(work)
        self._queue.put(waited)
        return waited

    def stop(self) -> None:
        """Ends the thread once its queue is empty, waiting up to ``join_timeout_s``.

        NOTE: the thread must not outlive the interpreter while it can still run Python code or
        free a work: a daemon thread that takes the GIL during finalization aborts the process.
        """
        self._queue.put(None)
        self._thread.join(self.join_timeout_s)

    def _run(self) -> None:
        while True:
            waited = self._queue.get()
            if waited is None:
                return
            try:
                waited.work.wait()
            except Exception as exc:
                waited.error = f"{type(exc).__name__}: {exc}"
            waited.done = True
            self._wake()  # after the flag: the woken agent sees it
            del waited  # hold no work (nor its tensors) while blocked on the queue


@dataclass
class _DistSend:
    handle: SendHandle
    notice: m.Notice
    staging: Region
    gather: Transfer
    work: _Waited | None = None


@dataclass
class _DistRecv:
    notice: m.Notice
    staging: Region
    dst: Region
    dst_offsets: np.ndarray
    sizes: np.ndarray
    work: _Waited
    scatter: Transfer | None = field(default=None)


class DistBackend(Backend):
    """Another host without NIXL: a two-rank torch.distributed group for this pair (gloo for
    CPU regions, NCCL for CUDA ones). Ranges are gathered into a staging buffer, sent as one
    tensor, received into a staging buffer and scattered into the destination region; the
    notice (sent first over the control socket) tells the receiver what to post."""

    name = "dist"
    #: free staging buffers kept per peer
    max_free_staging = 4

    def __init__(self, agent: TransferAgent, peer: Peer) -> None:
        super().__init__(agent, peer)
        self._store: Any = None
        self._pg: Any = None
        self._kind = (
            "nccl" if any(r.region.device.is_cuda for r in agent._regions.values()) else "gloo"
        )
        self._other = 1
        self._seq = 0
        self._sends: list[_DistSend] = []  # posted or not, until the send completes
        # outbound notices in submission order: a send's goes once its gather finished, and a
        # plain notice waits behind it
        self._unposted: deque[_DistSend | m.Notice] = deque()
        self._recvs: list[_DistRecv | m.Notice] = []  # inbound, in the order sent
        self._free: list[Region] = []
        self._send_waiter: _Waiter | None = None
        self._recv_waiter: _Waiter | None = None

    def _waiters(self) -> tuple[_Waiter, _Waiter]:
        if self._send_waiter is None or self._recv_waiter is None:
            wake = self.agent.wakeup.signal
            self._send_waiter = _Waiter(f"epdrt-dist-send-{self.peer.name}", wake)
            self._recv_waiter = _Waiter(f"epdrt-dist-recv-{self.peer.name}", wake)
        return self._send_waiter, self._recv_waiter

    def _group(self, store: Any, rank: int, timeout: float) -> Any:
        import torch.distributed as dist

        td = datetime.timedelta(seconds=timeout)
        listener, connector = (self.agent.name, self.peer.name)[:: 1 if rank == 0 else -1]
        prefix = dist.PrefixStore(f"epdrt/{listener}/{connector}", store)
        if self._kind == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = td
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.agent.dist_host)]
            return dist.ProcessGroupGloo(prefix, rank, 2, opts)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td
        return dist.ProcessGroupNCCL(prefix, rank, 2, opts)

    def listener_setup(self) -> bytes:
        import torch.distributed as dist

        td = datetime.timedelta(seconds=self.agent.timeout)
        self._store = dist.TCPStore(self.agent.dist_host, 0, 2, True, td, wait_for_workers=False)
        self._other = 1
        return msgspec.msgpack.encode(
            _DistSetup(host=self.agent.dist_host, port=self._store.port, backend=self._kind)
        )

    def listener_connect(self, timeout: float) -> None:
        self._pg = self._group(self._store, 0, timeout)

    def connector_setup(self, setup: bytes, timeout: float) -> bytes:
        import torch.distributed as dist

        info = msgspec.msgpack.decode(setup, type=_DistSetup)
        self._kind = info.backend
        td = datetime.timedelta(seconds=timeout)
        self._store = dist.TCPStore(info.host, info.port, 2, False, td)
        self._other = 0
        self._pg = self._group(self._store, 1, timeout)
        return b""

    # ---- staging ----
    def _acquire(self, nbytes: int, device: Any) -> Region:
        for i, r in enumerate(self._free):
            if r.nbytes >= nbytes and r.device == device:
                return self._free.pop(i)
        size = 1 << 20
        while size < nbytes:
            size *= 2
        return Region.create(size, device)

    def _release(self, region: Region) -> None:
        if len(self._free) < self.max_free_staging:
            self._free.append(region)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % (1 << 31)
        return self._seq

    # ---- sending ----
    def write(self, handle, src, dst, src_offsets, dst_offsets, sizes) -> None:
        keep = sizes > 0
        src_offsets, dst_offsets, sizes = src_offsets[keep], dst_offsets[keep], sizes[keep]
        total = int(sizes.sum())
        if total == 0:
            self.peer._send(handle.notice)
            handle._finish()
            return
        staging = self._acquire(total, src.device)
        packed = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        gather = self.agent.engine.submit_blocks(src, staging, src_offsets, packed, sizes)
        ranges = np.stack([dst_offsets, sizes], axis=1).astype("<i8").tobytes()
        notice = msgspec.structs.replace(handle.notice, seq=self._next_seq(), ranges=ranges)
        send = _DistSend(handle, notice, staging, gather)
        self._sends.append(send)
        self._unposted.append(send)

    def send_plain(self, notice: m.Notice) -> None:
        if self._unposted:
            self._unposted.append(notice)
        else:
            self.peer._send(notice)

    def on_notice(self, notice: m.Notice) -> bool:
        # Notices are delivered in the order they were sent: a plain one waits behind data
        # still being received.
        if not notice.ranges:
            if not self._recvs:
                return True
            self._recvs.append(notice)
            return False
        try:
            ranges = np.frombuffer(notice.ranges, dtype="<i8").reshape(-1, 2)
            dst = self.agent._local_region(notice.region)
        except (ValueError, InvalidArgument) as exc:
            raise TransferError(f"bad transfer notice from {self.peer.name}: {exc}") from exc
        dst_offsets = ranges[:, 0].astype(np.int64)
        sizes = ranges[:, 1].astype(np.int64)
        total = int(sizes.sum())
        if (
            (sizes < 0).any()
            or (dst_offsets < 0).any()
            or int((dst_offsets + sizes).max()) > dst.nbytes
        ):
            raise TransferError(f"transfer notice from {self.peer.name} names bytes out of bounds")
        staging = self._acquire(total, dst.device)
        tensor = staging.tensor(torch.uint8, (total,))
        work = self._waiters()[1].add(self._pg.recv([tensor], self._other, notice.seq))
        plain = msgspec.structs.replace(notice, ranges=b"", seq=0)
        self._recvs.append(_DistRecv(plain, staging, dst, dst_offsets, sizes, work))
        return False

    def _post_sends(self) -> None:
        while self._unposted:
            head = self._unposted[0]
            if isinstance(head, m.Notice):
                self.peer._send(head)
            elif not head.gather.done():
                return
            elif head.gather.state == "failed":
                self._sends.remove(head)
                self._release(head.staging)
                head.handle._finish(f"gathering for {self.peer.name} failed: {head.gather.error}")
            else:
                self.peer._send(head.notice)
                tensor = head.staging.tensor(torch.uint8, (head.notice.nbytes,))
                work = self._pg.send([tensor], self._other, head.notice.seq)
                head.work = self._waiters()[0].add(work)
            self._unposted.popleft()

    def progress(self) -> None:
        self._post_sends()
        for s in list(self._sends):
            if s.work is None or not s.work.done:
                continue
            self._sends.remove(s)
            error = s.work.error
            if error is None:
                self._release(s.staging)
            else:
                _GRAVEYARD.append(s)
            s.handle._finish(None if error is None else f"send to {self.peer.name}: {error}")
        for r in self._recvs:
            if isinstance(r, m.Notice):
                continue
            if r.scatter is None:
                if not r.work.done:
                    continue
                error = r.work.error
                if error is not None:
                    raise TransferError(f"receiving from {self.peer.name} failed: {error}")
                packed = np.concatenate(([0], np.cumsum(r.sizes)[:-1])).astype(np.int64)
                r.scatter = self.agent.engine.submit_blocks(
                    r.staging, r.dst, packed, r.dst_offsets, r.sizes
                )
            if r.scatter.done() and r.scatter.state == "failed":
                raise TransferError(f"scattering data from {self.peer.name}: {r.scatter.error}")
        while self._recvs:
            head = self._recvs[0]
            if isinstance(head, m.Notice):
                self.peer._deliver(head)
            elif head.scatter is not None and head.scatter.done():
                self._release(head.staging)
                self.peer._deliver(head.notice)
            else:
                break
            self._recvs.pop(0)

    def needs_polling(self) -> bool:
        # Every completion wakes the agent: gathers and scatters through the engine's
        # completion fd, sends and receives through the waiters' wakeup fd.
        return False

    def fail_all(self, reason: str) -> None:
        sends, self._sends = self._sends, []
        self._unposted.clear()
        recvs, self._recvs = self._recvs, []
        for s in sends:
            _GRAVEYARD.append(s)  # gloo may still touch the staging buffer
            s.handle._finish(reason)
        _GRAVEYARD.extend(r for r in recvs if not isinstance(r, m.Notice))
        if sends or recvs:
            _GRAVEYARD.append(self._pg)  # destroying a group with work in flight can block

    def close(self) -> None:
        for waiter in (self._send_waiter, self._recv_waiter):
            if waiter is not None:
                waiter.stop()
        self._pg = None
        self._store = None
        self._free.clear()
