# SPDX-License-Identifier: Apache-2.0
"""Prefill role: admits requests by MM-token bytes, gathers their images' tokens from the
encoders, runs the LM prefill, emits the first token and hands the KV to a decode worker.

The hand-off (``EPDConfig.kv_handoff``): ``layerwise``, the decoder is asked for blocks when
a request is admitted (``KVReserve`` / ``KVDest``), its prefill starts once they are known,
and each layer's slice of the blocks a
step wrote is copied into them as soon as the layer is written, so the copy overlaps the
layers after it; the decoder is told once the last byte has landed (``KVReady(pushed=True)``).
``pull``, the KV is staged here and the decoder copies it after the prefill (``KVReady``;
``KVPulled`` frees it here).

Admission is FIFO and per request: a request enters only when blocks for all of its missing
images can be reserved in this worker's MM cache (back-pressure, no worst-case reservation).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from epdrt import scheduler
from epdrt.cache.sizing import blocks_for
from epdrt.device import wait_for_producer
from epdrt.errors import InvalidArgument, PoolExhausted
from epdrt.kernels import cached_source_rows, mm_embed
from epdrt.models.paged import FlatBatch
from epdrt.runtime import messages as m
from epdrt.runtime.mm_claims import WANT_TRANSITIONS, Want, WantEvent, advance
from epdrt.runtime.sampling import sample

if TYPE_CHECKING:
    from epdrt.runtime.worker import Worker


#: Seconds a prefill step waits, at its end, for the copies of the sequences it finished
#: pushing (the rest of the step's pushes overlapped its forward).
PUSH_TAIL_WAIT_S = 1.0


@dataclass
class _Want:
    """One request's need for one image here (``mm_claims.Want``); ``expires``: the
    monotonic second by which an orphan's MMReady must have come (its encoder is gone after)."""

    req_id: str
    slot: m.ImageSlot
    state: Want = Want.NEW
    expires: float = 0.0

    def advance(self, event: WantEvent) -> None:
        self.state = advance(WANT_TRANSITIONS, self.state, event)


@dataclass
class _Request:
    """A request here: its message, model extras, one want per distinct image, and the
    encode seconds its images cost (reported with its first token)."""

    msg: m.PrefillRequest
    extras: dict[str, torch.Tensor]
    wants: dict[bytes, _Want]  # unique images of the request
    encode_s: float = 0.0
    #: Once prefilling: prompt tokens whose K/V is in the cache, and each prompt row's
    #: MM-cache page row (-1 for text), ``[n] int64`` on the device.
    done: int = 0
    mm_rows: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return all(w.state is Want.HELD for w in self.wants.values())

    def blocks_of_next(self, take: int, block_size: int) -> range:
        """Indices into the block table of the blocks the next ``take`` tokens write."""
        return range(self.done // block_size, (self.done + take - 1) // block_size + 1)

    @property
    def remaining(self) -> int:
        return len(self.msg.input_ids) - self.done


@dataclass
class _Push:
    """A layer-wise hand-off of one sequence's KV into its decoder's blocks, from the
    ``KVReserve`` until the decoder is told that the last byte landed (``KVReady``) or that
    none will come (``KVPushEnded``); the decoder's blocks are not written after either."""

    decoder: str
    dest: np.ndarray | None = None  #: the decoder's blocks (``KVDest``), int64
    in_flight: int = 0  #: copies submitted and not yet ended
    error: str | None = None  #: the first copy that failed, why
    #: Once prefilled: the ``KVReady`` (and its frames) to send when the copies have ended.
    ready: tuple[m.KVReady, list[torch.Tensor]] | None = None
    #: It ends without a sequence to decode: aborted (``reason``), or finished at its first
    #: token (``reason`` None).
    ended: bool = False
    reason: str | None = None


class PrefillRole:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        assert worker.mm is not None and worker.kv is not None
        self.mm, self.kv = worker.mm, worker.kv
        self.queue: deque[_Request] = deque()  # not yet admitted
        self.admitted: dict[str, _Request] = {}
        # Prefilling, in start order: the prompt's KV blocks are reserved, its chunks run.
        self.running: dict[str, _Request] = {}
        self.staged: set[str] = set()  # requests whose KV waits here for its decoder to pull
        # image key -> the want whose reservation it is (RESERVED, RECEIVING or ORPHAN)
        self.receiving: dict[bytes, _Want] = {}
        self.pushes: dict[str, _Push] = {}  # layer-wise hand-offs under way, by request

    # ---- messages --------------------------------------------------------------------------
    def handle(self, msg: object, frames: list[bytes]) -> bool:
        if isinstance(msg, m.PrefillRequest):
            extras = m.named_tensors(msg.extras, frames)
            wants = {slot.key: _Want(msg.req_id, slot) for slot in msg.images}
            self.queue.append(_Request(msg, extras, wants))
            return True
        if isinstance(msg, m.MMReady):
            self._mm_ready(msg)
            return True
        if isinstance(msg, m.KVPulled):
            self._unstage(msg.req_id)
            return True
        if isinstance(msg, m.KVDest):
            self._dest(msg)
            return True
        return False

    def _mm_ready(self, msg: m.MMReady) -> None:
        req = self.admitted.get(msg.req_id)
        if req is not None:
            req.encode_s += msg.encode_s
        want = self.receiving.get(msg.key)
        if want is None or want.req_id != msg.req_id:
            return  # the answer to a fetch that only released the encoder's claim
        error = msg.error
        if error is None:
            error = self.w.digest_mismatch(msg.digest, self.mm.tokens(self.mm.reserved(msg.key)))
        orphan = want.state is Want.ORPHAN
        if error is not None:
            want.advance(WantEvent.READY_ERROR)
            self._pass_on(msg.key)
            if not orphan:
                source = want.slot.encoder
                self.w.fail(msg.req_id, f"receiving an image from {source}: {error}")
            return
        want.advance(WantEvent.READY)
        del self.receiving[msg.key]
        self.mm.commit(msg.key)  # held once, by the reservation
        for heir in self._awaiting(msg.key):
            self._hold_committed(heir)
        if orphan:  # cached for later requests, held by none
            self.w.count("mm_orphans_committed")
            self.mm.release(msg.key)

    def _awaiting(self, key: bytes) -> list[_Want]:
        """The wants of admitted requests that await ``key``, in admission order."""
        wants = (r.wants.get(key) for r in self.admitted.values())
        return [w for w in wants if w is not None and w.state is Want.AWAITING]

    def _hold_committed(self, want: _Want) -> None:
        """An awaited image was committed here: ``want`` holds it; its encoder's claim goes."""
        self.mm.lookup(want.slot.key)
        want.advance(WantEvent.COMMITTED)
        self._send_fetch(want, [])

    def _pass_on(self, key: bytes) -> None:
        """A reservation whose copy is over but did not arrive (error, or an orphan's encoder
        gone): the first request awaiting the image fetches into the same blocks, else they
        are freed."""
        heirs = self._awaiting(key)
        if not heirs:
            del self.receiving[key]
            self.mm.abort(key)
            return
        heir = heirs[0]
        self.receiving[key] = heir
        heir.advance(WantEvent.INHERIT)
        self._send_fetch(heir, list(self.mm.reserved(key).blocks))

    def _send_fetch(self, want: _Want, blocks: list[int]) -> None:
        """Asks the image's encoder to copy it into ``blocks`` (none: only drop the claim)."""
        fetch = m.FetchMM(want.req_id, want.slot.key, self.w.name, blocks)
        self.w.send(want.slot.encoder, fetch)

    # ---- work ------------------------------------------------------------------------------
    def step(self) -> bool:
        self._expire_orphans()
        progressed = self._admit()
        progressed = self._poll_local_encoder() or progressed
        # One flat forward of at most prefill_max_batch_tokens prompt tokens (the policy is
        # epdrt.scheduler's, shared with the planner's simulator).
        ready = [r for r in self.admitted.values() if r.ready and self._has_dest(r)]
        chunks = scheduler.prefill_chunks(
            ((r.msg.req_id, r.remaining) for r in self.running.values()),
            ((r.msg.req_id, r.remaining) for r in ready),
            self.w.config.prefill_max_batch_tokens,
            lambda req_id: self._start(self.admitted[req_id]),
        )
        batch = [(self.running[req_id], take) for req_id, take in chunks]
        if batch:
            self._prefill(batch)
        return progressed or bool(batch)

    def _start(self, req: _Request) -> bool:
        """Reserves KV blocks for ``req``'s whole prompt and moves it to ``running``; False
        (back-pressure) when too few blocks are free, leaving a decode role here its
        headroom."""
        n = len(req.msg.input_ids)
        headroom = self.w.decode.headroom if self.w.decode is not None else 0
        if blocks_for(n, self.kv.block_size) > self.kv.num_free_blocks - headroom:
            self.w.count("prefill_kv_waits")  # decode frees blocks as sequences end or leave
            return False
        placements = [(slot.start, self.mm.peek(slot.key)) for slot in req.msg.images]
        req.mm_rows = cached_source_rows(n, self.mm, placements)
        self.kv.extend(req.msg.req_id, n)
        del self.admitted[req.msg.req_id]
        self.running[req.msg.req_id] = req
        return True

    def _admit(self) -> bool:
        admitted_any = False
        while self.queue:
            req = self.queue[0]
            try:
                self._reserve(req)
            except PoolExhausted:
                self.w.count("prefill_admission_waits")
                return admitted_any  # back-pressure: retry when blocks are released
            except InvalidArgument as exc:
                self.queue.popleft()
                self.w.fail(req.msg.req_id, str(exc))
                continue
            self.queue.popleft()
            self.admitted[req.msg.req_id] = req
            self._reserve_decoder(req)
            for want in req.wants.values():
                if want.state is Want.RESERVED:
                    want.advance(WantEvent.FETCH_SENT)
                    self._send_fetch(want, list(self.mm.reserved(want.slot.key).blocks))
                elif want.state is Want.HELD:
                    self._send_fetch(want, [])
            admitted_any = True
        return admitted_any

    def _reserve(self, req: _Request) -> None:
        """Holds or reserves MM blocks for every remote image of ``req``; all or nothing (on
        an error nothing stays held or reserved, and no fetch has gone out).

        An image another want of this worker is receiving is neither reserved nor fetched
        again: this request awaits that copy, and the encoder keeps its claim until then (so
        the image can still be fetched if that copy fails).
        """
        try:
            for key, want in req.wants.items():
                if want.slot.encoder == self.w.name:
                    want.advance(WantEvent.LOCAL)  # this worker's encode role hands it over
                elif key in self.receiving:
                    want.advance(WantEvent.AWAIT)
                elif self.mm.lookup(key) is not None:
                    want.advance(WantEvent.HIT)
                else:
                    self.mm.reserve(key, want.slot.num_tokens)
                    want.advance(WantEvent.RESERVE)
                    self.receiving[key] = want
        except Exception:
            self._release(req, WantEvent.ABORT)
            req.wants = {k: _Want(w.req_id, w.slot) for k, w in req.wants.items()}  # a retry
            raise

    def _poll_local_encoder(self) -> bool:
        """Takes over the holds of admitted requests' local images, a request's all at once."""
        if self.w.encode is None:
            return False
        progressed = False
        for req in self.admitted.values():
            local = [w for w in req.wants.values() if w.state is Want.LOCAL]
            if not local:
                continue
            seconds = self.w.encode.hand_over(req.msg.req_id, [w.slot.key for w in local])
            if seconds is not None:  # the encoder's holds become this request's
                for want in local:
                    want.advance(WantEvent.HANDED_OVER)
                req.encode_s += seconds
                progressed = True
        return progressed

    def _expire_orphans(self) -> None:
        """Passes on the reservations of orphans whose MMReady is overdue.

        NOTE: an encoder answers every fetch once its copy ends, and a copy takes milliseconds;
        an answer missing for ``request_timeout_s`` means the encoder died (the cluster fails
        its requests but cannot tell this worker which copies will never run).
        """
        now = time.monotonic()
        for key, want in list(self.receiving.items()):
            if want.state is Want.ORPHAN and now > want.expires:
                want.advance(WantEvent.EXPIRED)
                self.w.count("mm_orphans_expired")
                self._pass_on(key)

    def _prefill(self, batch: list[tuple[_Request, int]]) -> None:
        """One forward of each request's next ``take`` prompt tokens; a request whose prompt
        is then complete gets its first token and its KV handed to its decoder."""
        start = time.perf_counter()
        try:
            ids, rows, seqs = [], [], []
            for req, take in batch:
                ids += req.msg.input_ids[req.done : req.done + take]
                rows.append(req.mm_rows[req.done : req.done + take])
                seqs.append((req.msg.req_id, take, req.done))
            text = self.w.model.embed(torch.tensor(ids, dtype=torch.int64, device=self.w.device))
            embeds = mm_embed(text, self.mm.storage, torch.cat(rows), check_indices=False)
            flat = FlatBatch.build(self.kv, seqs)
            hook = self._layer_pusher(batch)
            if hook is not None:
                flat = dataclasses.replace(flat, on_layer_written=hook)
            logits = self.w.model.forward(embeds, flat, [req.extras for req, _ in batch])
            prefilled_at = time.monotonic()
        except Exception as exc:  # e.g. out of memory: these requests fail, the worker goes on
            for req, _ in batch:
                self._drop_running(req, WantEvent.ABORT)
                self.w.fail(req.msg.req_id, f"prefill step failed: {type(exc).__name__}: {exc}")
            return
        self.w.count("prefill_seconds", time.perf_counter() - start)
        self.w.count("prefill_batches")
        self.w.count("prefill_tokens", len(ids))
        staged = []
        for (req, take), row in zip(batch, logits):
            req.done += take
            if req.remaining:
                self.w.count("prefill_chunks")
                continue
            del self.running[req.msg.req_id]
            self._release(req, WantEvent.PREFILLED)
            token = sample(row, req.msg.sampling, req.msg.first_index)
            ready = self._hand_off(req, token, prefilled_at)
            if ready is not None:
                staged.append(ready)
        if staged:
            # The decoders copy the staged KV on streams of their own processes, which nothing
            # orders after this one: the writes must be done before they are told.
            wait_for_producer(self.w.device)
        for decoder, ready, frames in staged:
            self.w.send(decoder, ready, frames)
        if any(p.ready is not None for p in self.pushes.values()):
            # The last layers' copies end now, the others overlapped the forward: their
            # decoders are told here, not after this worker's next step.
            self.w.finish_copies(PUSH_TAIL_WAIT_S)

    def _hand_off(
        self, req: _Request, token: int, prefilled_at: float
    ) -> tuple[str, m.KVReady, list[torch.Tensor]] | None:
        """Reports the first token; returns the decoder and the ``KVReady`` (with its frames)
        to send once the KV writes are done, or None: the sequence is handed over in-process,
        or its KV is being pushed (the ``KVReady`` goes once the copies have ended).

        The prompt's KV is already in this worker's cache, under the request id: it stays
        there (staged) until the decoder has pulled it, or the push has ended.
        """
        msg = req.msg
        eos = self.w.model.spec.eos_token_ids
        index = msg.first_index
        finished = index + 1 >= msg.max_new_tokens or msg.sampling.finishes(token, eos)
        self.w.send(
            "cluster",
            m.Tokens(
                events=[m.TokenEvent(msg.req_id, index, token, finished)],
                encode_s={msg.req_id: req.encode_s},
            ),
        )
        push = self.pushes.get(msg.req_id)
        if finished:
            self.kv.free(msg.req_id)
            if push is not None:
                push.ended, push.reason = True, None
                self._settle(msg.req_id)
            return None
        decode_extras = self.w.model.decode_extras(req.extras)
        if self.w.decode is not None and msg.decoder == self.w.name:
            self.w.decode.start_local(
                msg.req_id, token, msg.max_new_tokens, decode_extras, msg.sampling, index
            )
            return None
        digest = None
        if self.w.config.verify_transfers:
            k, v = self.kv.read(msg.req_id)
            digest = int(self.w.digest(torch.stack([k, v], dim=1)))
        self.staged.add(msg.req_id)
        entries, frames = m.named_entries(decode_extras)
        ready = m.KVReady(
            msg.req_id,
            self.w.name,
            self.kv.block_table(msg.req_id),
            len(msg.input_ids),
            token,
            msg.max_new_tokens,
            entries,
            digest,
            msg.sampling,
            index,
            pushed=push is not None,
            prefilled_at=prefilled_at,
        )
        if push is None:
            return msg.decoder, ready, frames
        push.ready = (ready, frames)
        self._settle(msg.req_id)
        return None

    # ---- layer-wise push -------------------------------------------------------------------
    def _has_dest(self, req: _Request) -> bool:
        """Whether ``req`` may start: it pushes no KV, or its decoder's blocks are known.

        NOTE: starting a push only then keeps every request that holds this cache's blocks
        free of waits on its decoder's room, so reservations made as requests are admitted
        (in any order of readiness) cannot deadlock the two caches.
        """
        push = self.pushes.get(req.msg.req_id)
        if push is None or push.dest is not None:
            return True
        self.w.count("prefill_kv_dest_waits")
        return False

    def _reserve_decoder(self, req: _Request) -> None:
        """Asks a remote decoder for blocks as the request is admitted: its answer has the
        request's image fetches (and the queue ahead) to arrive in before the prefill may
        start, and every layer is pushed as soon as it is written."""
        decoder = req.msg.decoder
        if self.w.config.kv_handoff == "layerwise" and decoder != self.w.name:
            self.pushes[req.msg.req_id] = _Push(decoder)
            n = len(req.msg.input_ids)
            self.w.send(decoder, m.KVReserve(req.msg.req_id, self.w.name, n))

    def _layer_pusher(self, batch: list[tuple[_Request, int]]):
        """The step's ``on_layer_written`` hook: each layer's slice of the blocks the step
        writes is copied into the decoder's blocks (one copy per decoder and layer); None
        when no request of the batch pushes."""
        plan: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str]]] = {}
        bs = self.kv.block_size
        for req, take in batch:
            push = self.pushes.get(req.msg.req_id)
            if push is None:
                continue
            assert push.dest is not None  # a push starts prefilling once its blocks are known
            idx = req.blocks_of_next(take, bs)
            table = np.asarray(self.kv.block_table(req.msg.req_id), dtype=np.int64)
            src, dst, ids = plan.setdefault(push.decoder, ([], [], []))
            src.append(table[idx.start : idx.stop])
            dst.append(push.dest[idx.start : idx.stop])
            ids.append(req.msg.req_id)
        if not plan:
            return None
        groups = [(d, np.concatenate(s), np.concatenate(t), ids) for d, (s, t, ids) in plan.items()]
        nbytes = self.kv.layer_nbytes

        def pushed_layer(layer: int) -> None:
            for decoder, src, dst, ids in groups:
                self._copy(ids, decoder, src, dst, (layer * nbytes, nbytes))

        return pushed_layer

    def _copy(
        self, ids: list[str], decoder: str, src: np.ndarray, dst: np.ndarray,
        span: tuple[int, int],
    ) -> None:  # fmt: skip
        """Copies ``span`` of blocks ``src`` of this cache into blocks ``dst`` of
        ``decoder``'s for the pushes of ``ids`` (each counts it in flight until it ends)."""
        for req_id in ids:
            self.pushes[req_id].in_flight += 1
        self.w.copy_blocks(
            self.kv.region, self.w.peer_kv_cache(decoder).region, src, dst,
            self.kv.block_nbytes, lambda error: self._pushed(ids, error),
            ("kv", self.w.name, decoder), span,
        )  # fmt: skip

    def _dest(self, msg: m.KVDest) -> None:
        """The decoder's blocks for a sequence that has not started prefilling (it starts
        once they are known)."""
        push = self.pushes.get(msg.req_id)
        if push is None:  # aborted, or ended before the decoder answered
            self.w.send(msg.src, m.KVPushEnded(msg.req_id, "aborted before its KV was pushed"))
            return
        push.dest = np.asarray(msg.blocks, dtype=np.int64)

    def _pushed(self, ids: list[str], error: str | None) -> None:
        for req_id in ids:
            push = self.pushes[req_id]
            push.in_flight -= 1
            push.error = push.error or error
            self._settle(req_id)

    def _settle(self, req_id: str) -> None:
        """Ends a push whose copies have all ended once it has an outcome: the decoder gets
        the ``KVReady`` (or ``KVPushEnded``: failed, aborted, finished at its first token),
        and the staged KV here is freed."""
        push = self.pushes[req_id]
        if push.in_flight or not (push.ended or (push.dest is not None and push.ready)):
            return  # copies in flight, or the decoder's blocks or the prefill's end to come
        del self.pushes[req_id]
        self._unstage(req_id)
        if push.dest is None:  # ended before the decoder answered: its KVDest is answered then
            return
        if push.ended:
            self.w.send(push.decoder, m.KVPushEnded(req_id, push.reason))
        elif push.error is not None:
            self.w.send(push.decoder, m.KVPushEnded(req_id, push.error))
            self.w.fail(req_id, f"KV push to {push.decoder} failed: {push.error}")
        else:
            self.w.send(push.decoder, *push.ready)

    # ---- cleanup ---------------------------------------------------------------------------
    def _unstage(self, req_id: str) -> None:
        """Frees a staged sequence's KV blocks (pulled by its decoder, or aborted)."""
        if req_id in self.staged:
            self.staged.discard(req_id)
            self.kv.free(req_id)

    def _release(self, req: _Request, event: WantEvent) -> None:
        """Ends every want of ``req`` (``PREFILLED`` or ``ABORT``): drops its holds and frees
        reservations no fetch went out for; one whose fetch did becomes an orphan, freed (or
        passed on) once its MMReady comes."""
        for key, want in req.wants.items():
            before = want.state
            if before is Want.DONE:  # its MMReady failed it; the blocks are handed on
                continue
            want.advance(event)
            if before is Want.HELD:
                self.mm.release(key)
            elif before is Want.RESERVED:
                del self.receiving[key]
                self.mm.abort(key)
            elif want.state is Want.ORPHAN:
                want.expires = time.monotonic() + self.w.config.request_timeout_s

    def _drop_running(self, req: _Request, event: WantEvent) -> None:
        """Ends a prefilling request: its wants, and its KV blocks."""
        del self.running[req.msg.req_id]
        self._release(req, event)
        self.kv.free(req.msg.req_id)

    def queue_depths(self) -> dict[str, float]:
        """Requests not yet admitted, admitted (room for their images reserved) and waiting for
        their images or for KV room, prefilling, and prefilled with their KV waiting here for a
        decoder to pull it."""
        return {
            "prefill_queued": float(len(self.queue)),
            "prefill_admitted": float(len(self.admitted)),
            "prefill_running": float(len(self.running)),
            "prefill_staged": float(len(self.staged)),
        }

    def abort(self, req_id: str) -> None:
        for req in [r for r in self.queue if r.msg.req_id == req_id]:
            self.queue.remove(req)
        req = self.admitted.pop(req_id, None)
        if req is not None:
            self._release(req, WantEvent.ABORT)
        req = self.running.get(req_id)
        if req is not None:
            self._drop_running(req, WantEvent.ABORT)
        push = self.pushes.get(req_id)
        if push is not None:
            push.ended, push.reason = True, "aborted"
            self._settle(req_id)
        self._unstage(req_id)
