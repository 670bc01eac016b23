# SPDX-License-Identifier: Apache-2.0
"""A stage worker process: one or more roles (encode, prefill, decode) on one device.

``python -m epdrt.runtime.worker SPEC_JSON`` runs one. The worker loads only what its roles
need, creates its caches in shareable regions, says Hello to the cluster, receives every peer's
endpoint and region descriptors once (the handshake), then loops: handle messages, let each
role make one step of progress. Roles in the same worker hand work to each other in-process
(no copies), which is how the ``pd`` and ``aggregated`` baselines run on the same code.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from epdrt import scheduler
from epdrt.cache import MMTokenCache, PagedKVCache, sizing
from epdrt.device import producer_stream
from epdrt.errors import TransferError
from epdrt.host_memory import keep_freed_host_memory
from epdrt.region import Region
from epdrt.runtime import messages as m
from epdrt.runtime.channel import SECRET_ENV, Channel
from epdrt.runtime.config import WorkerSpec
from epdrt.runtime.decode_role import DecodeRole
from epdrt.runtime.encode_role import EncodeRole
from epdrt.runtime.integrity import content_digest
from epdrt.runtime.mm_claims import IllegalTransition
from epdrt.runtime.prefill_role import PrefillRole
from epdrt.runtime.stage_model import StageModel
from epdrt.runtime.wire import WireError
from epdrt.transfer.engine import Transfer, TransferEngine

IDLE_POLL_S = 0.02
MAX_MESSAGES_PER_STEP = 256
# Before a step, a copy still in flight is waited for up to this long (seconds), once: a copy's
# callback (a pulled KV joining the decode batch, an image's MMReady) runs between steps, and a
# copy a millisecond from done would otherwise wait for the whole next step (a prefill batch:
# hundreds of milliseconds on a CPU host). A slower copy is not waited for again; an idle
# worker wakes as soon as any copy ends (the engine's completion fd is on its poll).
COPY_WAIT_S = 0.005
#: ``Transfer.path`` of a copy between GPUs without peer access: loud, once per link.
SLOW_COPY_PATH = "cuda-peer-memcpy"


@dataclass(slots=True)
class PendingCopy:
    """A copy in flight and what runs when it ends; ``waited``: the loop has waited for it."""

    transfer: Transfer
    then: Callable[[str | None], None]
    waited: bool = False


class Worker:
    """Owns the channel, the caches and the roles of one worker process."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.config = spec.config
        self.device = torch.device(spec.device)
        roles = set(spec.roles)
        secret = os.environ.pop(SECRET_ENV, None)  # tcp control: the cluster's signing key
        self.channel = Channel(
            spec.endpoint, secret=bytes.fromhex(secret) if secret is not None else None
        )
        self.channel.connect("cluster", spec.cluster_endpoint)
        self.model = StageModel.load(spec.model_dir, roles, self.device, self.config.dtype)
        self.mm: MMTokenCache | None = None
        self.kv: PagedKVCache | None = None
        if roles & {"encode", "prefill"}:
            self.mm = self._mm_cache()
        if roles & {"prefill", "decode"}:
            self.kv = self._kv_cache()
        # Cache-to-cache copies between this worker's regions and its peers' (mapped over IPC:
        # MM pages pushed to a prefill, KV pulled from one) run on this engine, off the main
        # loop; ``outbox`` holds each until it completes. The loop's poll also wakes
        # when one ends.
        self.engine = TransferEngine(num_threads=self.config.cpu_threads)
        self.channel.watch(self.engine.completion_fd)
        self.outbox: list[PendingCopy] = []
        self._slow_links: set[tuple[str, str]] = set()  # (source, destination) warned about
        self.peer_mm: dict[str, MMTokenCache] = {}
        self.peer_kv: dict[str, PagedKVCache] = {}
        self._mm_descs: dict[str, bytes] = {}
        self._kv_descs: dict[str, bytes] = {}
        self.counters: dict[str, float] = {}
        self.encode = EncodeRole(self) if "encode" in roles else None
        self.decode = DecodeRole(self) if "decode" in roles else None
        self.prefill = PrefillRole(self) if "prefill" in roles else None
        # Each loop iteration steps every role once, in pipeline order (scheduler.ROLE_ORDER,
        # which the planner's simulator uses too): a new request's images are encoded, then
        # (MM tokens local) prefilled in the same iteration, before the next decode step of
        # the running sequences; under load the stages take turns.
        self.roles = [r for r in (getattr(self, n) for n in scheduler.ROLE_ORDER) if r is not None]

    # ---- caches ----------------------------------------------------------------------------
    def _mm_cache(self, region: Region | None = None) -> MMTokenCache:
        """An MM-token cache of the configured size: this worker's (a new region) or a
        peer's (``region``, opened here); every worker's has the same layout."""
        cfg = self.config
        return sizing.mm_cache(
            self.model.spec, cfg.mm_cache_tokens, cfg.mm_block_size, self.model.dtype,
            self.device, region=region,
        )  # fmt: skip

    def _kv_cache(self, region: Region | None = None) -> PagedKVCache:
        """A KV cache of the configured size, as ``_mm_cache``."""
        cfg = self.config
        return sizing.kv_cache(
            self.model.spec, cfg.kv_cache_tokens, cfg.kv_block_size, self.model.dtype,
            self.device, region=region,
        )  # fmt: skip

    def peer_mm_cache(self, name: str) -> MMTokenCache:
        """The MM cache of worker ``name``, mapped into this process on first use."""
        if name not in self.peer_mm:
            self.peer_mm[name] = self._mm_cache(Region.open(self._mm_descs[name]))
        return self.peer_mm[name]

    def peer_kv_cache(self, name: str) -> PagedKVCache:
        """The KV cache of worker ``name``, mapped into this process on first use."""
        if name not in self.peer_kv:
            self.peer_kv[name] = self._kv_cache(Region.open(self._kv_descs[name]))
        return self.peer_kv[name]

    def copy_blocks(
        self,
        src: Region,
        dst: Region,
        src_blocks: list[int] | np.ndarray,
        dst_blocks: list[int] | np.ndarray,
        block_nbytes: int,
        then: Callable[[str | None], None],
        link: tuple[str, str, str],
        span: tuple[int, int] | None = None,
    ) -> None:
        """Starts copying whole blocks ``src_blocks[i]`` -> ``dst_blocks[i]`` between two
        block regions, or with ``span = (offset, nbytes)`` only those bytes of each block (one
        layer's slice of KV blocks); ``then(error)`` runs in the main loop once the copy is
        done. The bytes are counted on ``link``, (what: "kv" or "mm", source worker,
        destination worker), as the counter ``m.LINK_BYTES + "<what>/<source>/<destination>"``.

        On a GPU the copy starts only after the work already on torch's current stream: it may
        have produced the source (an image's tokens) or still read the destination (blocks
        freed by a finished sequence).
        """
        offset, nbytes = span or (0, block_nbytes)
        transfer = self.engine.submit_blocks(
            src,
            dst,
            np.asarray(src_blocks, dtype=np.int64) * block_nbytes + offset,
            np.asarray(dst_blocks, dtype=np.int64) * block_nbytes + offset,
            nbytes,
            after_stream=producer_stream(self.device),
        )
        self.outbox.append(PendingCopy(transfer, then))
        self.count(m.LINK_BYTES + "/".join(link), len(src_blocks) * nbytes)
        path = transfer.path
        self.count(m.LINK_COPIES + "/".join((*link, path)))
        if path == SLOW_COPY_PATH and link[1:] not in self._slow_links:
            self._slow_links.add(link[1:])
            print(f"{self.name}: WARNING: copies {link[1]} -> {link[2]} are staged through the"
                  " host (no peer access between their GPUs): a fraction of the link's"
                  " bandwidth", file=sys.stderr)  # fmt: skip

    def finish_copies(self, wait_s: float) -> None:
        """Waits up to ``wait_s`` seconds for the copies in flight and runs the callbacks of
        those that ended (a layer-wise push's last copies, at the end of its prefill step)."""
        self._finish_transfers(wait_s)

    def _finish_transfers(self, wait_s: float = 0.0) -> bool:
        """Runs the callbacks of finished copies, in submission order; True if any ran.

        First waits, up to ``wait_s`` seconds in all, for the copies in flight that it has not
        waited for before (each copy at most once: one slower than that is not waited for
        again, so it delays at most one step).
        """
        deadline = time.monotonic() + wait_s
        for copy in self.outbox:
            if copy.waited:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            copy.waited = True
            try:
                copy.transfer.wait(left)
            except TimeoutError:
                break
            except TransferError:
                pass  # failed: its callback reports it below
        # One done() per transfer: one that finishes between two polls must land in exactly
        # one of the two lists.
        done, pending = [], []
        for copy in self.outbox:
            (done if copy.transfer.done() else pending).append(copy)
        if not done:
            return False
        self.outbox = pending
        for copy in done:
            t = copy.transfer
            copy.then(None if t.state == "done" else t.error or "copy failed")
            t.release()
        return True

    def digest(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """``tensor``'s content digest (asynchronous) when hand-offs are verified, else None."""
        return content_digest(tensor) if self.config.verify_transfers else None

    def digest_mismatch(self, sent: int | None, received: torch.Tensor) -> str | None:
        """Why ``received`` is not what the sender digested as ``sent`` (None: it is, or the
        sender sent no digest); counts the checks and the mismatches."""
        if sent is None:
            return None
        self.count("transfer_digest_checks")
        got = int(content_digest(received))
        if got == sent:
            return None
        self.count("transfer_digest_mismatches")
        return f"the bytes that arrived differ from those sent (digest {got:#x}, sent {sent:#x})"

    def count(self, name: str, amount: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + amount

    def send(self, peer: str, msg: m.Msg, tensors: list[torch.Tensor] | None = None) -> None:
        self.channel.send(peer, msg, tensors or ())

    def fail(self, req_id: str, error: str) -> None:
        """Reports the failure to the cluster, then frees everything ``req_id`` holds here.

        The report goes first: freeing answers peers (an encoder's pending fetches), whose own
        reports of the same failure must come after this one, the cause."""
        self.send("cluster", m.Failed(req_id=req_id, error=f"{self.name}: {error}"))
        for role in self.roles:
            role.abort(req_id)

    # ---- main loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.send(
            "cluster",
            m.Hello(
                worker=self.name,
                pid=os.getpid(),
                mm_region=self.mm.region.export() if self.mm is not None else None,
                kv_region=self.kv.region.export() if self.kv is not None else None,
                device=str(self.device),
            ),
        )
        inbox = self._await_peers()
        busy = False
        next_report = time.monotonic()
        while True:
            interval = self.config.stats_interval_s
            if interval and time.monotonic() >= next_report:
                self.send("cluster", m.Stats(self.name, self.stats(), final=False))
                next_report = time.monotonic() + interval
            got = self._recv(0.0 if busy or inbox else IDLE_POLL_S)
            if got is not None:
                inbox.append(got)
            elif not inbox and not busy and os.getppid() != self.spec.parent_pid:
                return  # the cluster is gone: exit quietly, the kernel reclaims our memory
            busy = False
            for role in self.roles:
                # Messages and finished copies are taken in before every role's step, not once
                # per round: what arrives while one role runs joins the next role's batch. A
                # request's prefill half that reaches this worker while its images encode is
                # prefilled right after them, not after another round of other requests'
                # encoding (a worker reads its messages between batches, as the planner's
                # simulator has it).
                if not self._take_messages(inbox):
                    return
                busy = self._finish_transfers(COPY_WAIT_S) or busy
                busy = role.step() or busy

    def _take_messages(self, inbox: list[tuple[object, list[bytes]]]) -> bool:
        """Adds the waiting messages to ``inbox`` (up to MAX_MESSAGES_PER_STEP in it, so a
        flood cannot starve the running batches), dispatches them in order and empties it;
        False after a Shutdown (the worker's counters sent)."""
        while len(inbox) < MAX_MESSAGES_PER_STEP:
            got = self._recv(0.0)
            if got is None:
                break
            inbox.append(got)
        for msg, frames in inbox:
            if isinstance(msg, m.Shutdown):
                self.send("cluster", m.Stats(worker=self.name, counters=self.stats()))
                return False
            self.dispatch(msg, frames)
        inbox.clear()
        return True

    def _recv(self, timeout_s: float) -> tuple[object, list[bytes]] | None:
        """``Channel.recv``, except that a message that does not decode is dropped (None)."""
        try:
            return self.channel.recv(timeout_s)
        except WireError as exc:
            self._drop(exc)
            return None

    def _drop(self, reason: Exception) -> None:
        """Counts and logs a message dropped as malformed or unknown; the worker goes on."""
        self.count("messages_dropped")
        print(f"{self.name}: dropped a message: {reason}", file=sys.stderr)

    def _await_peers(self) -> list[tuple[object, list[bytes]]]:
        """Waits for the handshake (``Peers``); returns what other peers sent meanwhile.

        NOTE: a peer that got its ``Peers`` first may message this worker before the cluster's
        ``Peers`` arrives here (separate sockets are not ordered), so those are kept for later.
        """
        early: list[tuple[object, list[bytes]]] = []
        deadline = time.monotonic() + self.config.worker_start_timeout_s
        while time.monotonic() < deadline:
            got = self._recv(IDLE_POLL_S)
            if got is None:
                if os.getppid() != self.spec.parent_pid:
                    raise RuntimeError("the cluster exited before the handshake")
                continue
            msg, _ = got
            if isinstance(msg, m.Peers):
                for name, endpoint in msg.endpoints.items():
                    if name != self.name:
                        self.channel.connect(name, endpoint)
                self._mm_descs, self._kv_descs = msg.mm_regions, msg.kv_regions
                return early
            early.append(got)
        limit = self.config.worker_start_timeout_s
        raise RuntimeError(f"no handshake from the cluster within {limit} s")

    def dispatch(self, msg: object, frames: list[bytes]) -> None:
        if isinstance(msg, m.Abort):
            for role in self.roles:
                role.abort(msg.req_id)
            return
        if isinstance(msg, m.Peers):
            self._peers_restarted(msg)
            return
        try:
            for role in self.roles:
                if role.handle(msg, frames):
                    return
        except (WireError, IllegalTransition) as exc:  # malformed, or not now (a duplicate)
            self._drop(exc)
            return
        self._drop(RuntimeError(f"no role here handles {type(msg).__name__}"))

    def _peers_restarted(self, msg: m.Peers) -> None:
        """Restarted peers: new connections (nothing queued for the dead process is sent to
        the new one) and their new regions, opened when first used. A copy still running on
        an old region keeps it mapped until the copy ends."""
        for name in msg.restarted:
            if name == self.name:
                continue
            self.channel.reconnect(name, msg.endpoints[name])
            self.peer_mm.pop(name, None)
            self.peer_kv.pop(name, None)
            if self.decode is not None:
                self.decode.peer_restarted(name)
        self._mm_descs, self._kv_descs = msg.mm_regions, msg.kv_regions
        self.count("peer_restarts_seen", len(msg.restarted))

    def stats(self) -> dict[str, float]:
        out = dict(self.counters)
        if self.device.type == "cuda":
            # The caches' regions are cudaMalloc'd by the core, outside torch's allocator.
            regions = sum(c.region.nbytes for c in (self.mm, self.kv) if c is not None)
            torch_peak = torch.cuda.max_memory_allocated(self.device)
            out["cache_region_bytes"] = float(regions)
            out["peak_memory_bytes"] = float(torch_peak + regions)
        else:
            out["peak_memory_bytes"] = float(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
        out["control_messages_rejected"] = float(self.channel.rejected)
        for role in self.roles:
            out.update(role.queue_depths())
        # Blocks held when the worker reports; at shutdown, after every request ended, anything
        # but 0 is a leak.
        for name, cache in (("mm", self.mm), ("kv", self.kv)):
            if cache is not None:
                out[f"{name}_blocks_in_use"] = float(cache.num_blocks - cache.num_free_blocks)
                out[f"{name}_blocks_total"] = float(cache.num_blocks)
        if self.mm is not None:
            out.update(
                mm_hits=self.mm.hits, mm_misses=self.mm.misses, mm_evictions=self.mm.evictions
            )
        return out


def main(argv: list[str]) -> int:
    spec = msgspec.json.decode(argv[0], type=WorkerSpec)
    if spec.device == "cpu":
        keep_freed_host_memory()
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        torch.set_num_threads(spec.config.cpu_threads)
    else:
        torch.cuda.set_device(torch.device(spec.device))
    try:
        Worker(spec).run()
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
