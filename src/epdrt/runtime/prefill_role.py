# SPDX-License-Identifier: Apache-2.0
"""Prefill role: admits requests by MM-token bytes, gathers their images' tokens from the
encoders, runs the LM prefill, emits the first token and stages the KV for a decode worker,
which pulls it (``KVReady``; ``KVPulled`` frees it here).

Admission is FIFO and per request: a request enters only when blocks for all of its missing
images can be reserved in this worker's MM cache (back-pressure, no worst-case reservation).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from epdrt.cache.sizing import blocks_for
from epdrt.device import wait_for_producer
from epdrt.errors import InvalidArgument, PoolExhausted
from epdrt.kernels import assemble_inputs_embeds
from epdrt.runtime import messages as m

if TYPE_CHECKING:
    from epdrt.runtime.worker import Worker


@dataclass
class _Request:
    msg: m.PrefillRequest
    extras: dict[str, torch.Tensor]
    keys: dict[bytes, m.ImageSlot]  # unique images of the request
    reserved: set[bytes] = field(default_factory=set)  # reserved here, committed on MMReady
    held: set[bytes] = field(default_factory=set)  # cache entries this request holds
    # images another request of this worker is receiving: held once that one commits them
    awaiting: set[bytes] = field(default_factory=set)
    encode_s: float = 0.0

    @property
    def ready(self) -> bool:
        return len(self.held) == len(self.keys)


class PrefillRole:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        assert worker.mm is not None and worker.kv is not None
        self.mm, self.kv = worker.mm, worker.kv
        self.queue: deque[_Request] = deque()  # not yet admitted
        self.admitted: dict[str, _Request] = {}
        self.staged: set[str] = set()  # requests whose KV waits here for its decoder to pull
        self.receiving: dict[bytes, str] = {}  # image key -> the request its blocks arrive for

    # ---- messages --------------------------------------------------------------------------
    def handle(self, msg: object, frames: list[bytes]) -> bool:
        from epdrt.runtime.worker import named_tensors

        if isinstance(msg, m.PrefillRequest):
            extras = named_tensors(msg.extras, frames)
            keys = {slot.key: slot for slot in msg.images}
            self.queue.append(_Request(msg, extras, keys))
            return True
        if isinstance(msg, m.MMReady):
            self._mm_ready(msg)
            return True
        if isinstance(msg, m.KVPulled):
            self._unstage(msg.req_id)
            return True
        return False

    def _mm_ready(self, msg: m.MMReady) -> None:
        req = self.admitted.get(msg.req_id)
        if req is None:
            return  # aborted or prefilled meanwhile
        req.encode_s += msg.encode_s
        error = msg.error
        if error is None and msg.key in req.reserved:
            error = self.w.digest_mismatch(msg.digest, self.mm.tokens(self.mm.reserved(msg.key)))
        if error is not None:
            self.w.fail(msg.req_id, f"receiving an image from {req.keys[msg.key].encoder}: {error}")
            return
        if msg.key not in req.reserved:
            return  # an answer to a fetch that only released the encoder's claim
        req.reserved.discard(msg.key)
        del self.receiving[msg.key]
        self.mm.commit(msg.key)
        req.held.add(msg.key)
        for other in self._awaiting(msg.key):
            other.awaiting.discard(msg.key)
            self._hold_committed(other, msg.key)
            self._release_claim(other, msg.key)

    def _awaiting(self, key: bytes) -> list[_Request]:
        return [r for r in self.admitted.values() if key in r.awaiting]

    def _release_claim(self, req: _Request, key: bytes) -> None:
        """Tells the image's encoder that ``req`` needs no copy (it frees its claim)."""
        slot = req.keys[key]
        self.w.send(slot.encoder, m.FetchMM(req.msg.req_id, key, self.w.name, []))

    def _hold_committed(self, req: _Request, key: bytes) -> bool:
        """Holds ``key`` for ``req`` if it is cached (committed) here."""
        if self.mm.lookup(key) is None:
            return False
        req.held.add(key)
        return True

    # ---- work ------------------------------------------------------------------------------
    def step(self) -> bool:
        progressed = self._admit()
        progressed = self._poll_local_encoder() or progressed
        # One step prefills ready requests together in one forward, right-padded to the
        # longest prompt: the budget counts requests x longest prompt, the tokens the forward
        # computes and holds activations for (always at least one request).
        batch: list[_Request] = []
        longest, budget = 0, self.w.config.prefill_max_batch_tokens
        staged_blocks = 0  # staging blocks the batch takes
        for req in [r for r in self.admitted.values() if r.ready]:
            n = len(req.msg.input_ids)
            if batch and (len(batch) + 1) * max(longest, n) > budget:
                break
            need = self._staging_blocks(req)
            if staged_blocks + need > self.kv.num_free_blocks:
                self.w.count("prefill_kv_waits")  # back-pressure: decode frees staged KV
                break
            longest = max(longest, n)
            staged_blocks += need
            batch.append(req)
        if batch:
            self._prefill(batch)
        return progressed or bool(batch)

    def _staging_blocks(self, req: _Request) -> int:
        """KV blocks the request's prompt takes here until decode has it (0: decode is local)."""
        if self.w.decode is not None and req.msg.decoder == self.w.name:
            return 0
        return blocks_for(len(req.msg.input_ids), self.kv.block_size)

    def _admit(self) -> bool:
        admitted_any = False
        while self.queue:
            req = self.queue[0]
            try:
                fetches = self._reserve(req)
            except PoolExhausted:
                self.w.count("prefill_admission_waits")
                return admitted_any  # back-pressure: retry when blocks are released
            except InvalidArgument as exc:
                self.queue.popleft()
                self.w.fail(req.msg.req_id, str(exc))
                continue
            self.queue.popleft()
            self.admitted[req.msg.req_id] = req
            for fetch, encoder in fetches:
                self.w.send(encoder, fetch)
            admitted_any = True
        return admitted_any

    def _reserve(self, req: _Request) -> list[tuple[m.FetchMM, str]]:
        """Reserves MM blocks for every remote image not cached here; all or nothing.

        An image another admitted request is receiving is neither reserved nor fetched again:
        this request waits for that copy, and the encoder keeps its claim until then (so the
        image can still be fetched if that request is aborted).
        """
        fetches = []
        try:
            for key, slot in req.keys.items():
                if slot.encoder == self.w.name:
                    continue  # the encode role in this worker delivers it in-process
                if key in self.receiving:
                    req.awaiting.add(key)
                    continue
                blocks: list[int] = []
                if not self._hold_committed(req, key):
                    blocks = self._reserve_one(req, key)
                fetches.append((m.FetchMM(req.msg.req_id, key, self.w.name, blocks), slot.encoder))
        except Exception:
            self._release(req)
            raise
        return fetches

    def _reserve_one(self, req: _Request, key: bytes) -> list[int]:
        entry = self.mm.reserve(key, req.keys[key].num_tokens)
        req.reserved.add(key)
        self.receiving[key] = req.msg.req_id
        return list(entry.blocks)

    def _poll_local_encoder(self) -> bool:
        if self.w.encode is None:
            return False
        progressed = False
        for req in self.admitted.values():
            for key, slot in req.keys.items():
                if slot.encoder == self.w.name and key not in req.held:
                    seconds = self.w.encode.claim_ready(req.msg.req_id, key)
                    if seconds is not None:  # the encoder's hold becomes this request's
                        req.held.add(key)
                        req.encode_s += seconds
                        progressed = True
        return progressed

    def _prefill(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        items = []
        for req in batch:
            del self.admitted[req.msg.req_id]
            ids = torch.tensor(req.msg.input_ids, dtype=torch.int64, device=self.w.device)
            placements = [(slot.start, self.mm.peek(slot.key)) for slot in req.msg.images]
            embeds = assemble_inputs_embeds(self.w.model.embed(ids), self.mm, placements)
            items.append((embeds, req.extras))
        try:
            outputs = self.w.model.prefill_batch(items)
        except Exception as exc:  # e.g. out of memory: these requests fail, the worker goes on
            for req in batch:
                self._release(req)
                self.w.fail(req.msg.req_id, f"prefill failed: {exc}")
            return
        self.w.count("prefill_seconds", time.perf_counter() - start)
        self.w.count("prefill_batches")
        staged = []
        for req, (logits, kv, decode_extras) in zip(batch, outputs):
            self._release(req)
            ready = self._hand_off(req, int(torch.argmax(logits)), kv, decode_extras)
            if ready is not None:
                staged.append(ready)
        if staged:
            # The decoders copy the staged KV on streams of their own processes, which nothing
            # orders after this one: the writes must be done before they are told.
            wait_for_producer(self.w.device)
        for decoder, ready, frames in staged:
            self.w.send(decoder, ready, frames)

    def _hand_off(
        self, req: _Request, token: int, kv: torch.Tensor, decode_extras: dict[str, torch.Tensor]
    ) -> tuple[str, m.KVReady, list[torch.Tensor]] | None:
        """Reports the first token; stages the KV for the decoder, returning the decoder and
        the ``KVReady`` (with its frames) to send once the staging writes are done, or hands
        the KV over in-process (None)."""
        msg = req.msg
        self.w.count("prefill_tokens", len(msg.input_ids))
        finished = msg.max_new_tokens <= 1 or token in self.w.model.spec.eos_token_ids
        self.w.send(
            "cluster",
            m.Tokens(
                events=[m.TokenEvent(msg.req_id, 0, token, finished)],
                encode_s={msg.req_id: req.encode_s},
            ),
        )
        if finished:
            return None
        n = len(msg.input_ids)
        if self.w.decode is not None and msg.decoder == self.w.name:
            self.w.decode.start_local(msg.req_id, kv, token, msg.max_new_tokens, decode_extras)
            return None
        try:
            slots = self.kv.reserve(msg.req_id, n)
        except PoolExhausted as exc:
            self.w.fail(msg.req_id, f"prefill KV staging: {exc}")
            return None
        # Read before the staging writes are queued, so a check does not order them.
        digest = self.w.digest(kv)
        digest = None if digest is None else int(digest)
        for layer in range(self.kv.num_layers):
            self.kv.write(layer, slots, kv[layer, 0], kv[layer, 1])
        self.staged.add(msg.req_id)
        entries, frames = m.named_entries(decode_extras)
        blocks = list(self.kv.block_table(msg.req_id))
        ready = m.KVReady(
            msg.req_id, self.w.name, blocks, n, token, msg.max_new_tokens, entries, digest
        )
        return msg.decoder, ready, frames

    # ---- cleanup ---------------------------------------------------------------------------
    def _unstage(self, req_id: str) -> None:
        """Frees a staged sequence's KV blocks (pulled by its decoder, or aborted)."""
        if req_id in self.staged:
            self.staged.discard(req_id)
            self.kv.free(req_id)

    def _release(self, req: _Request) -> None:
        """Frees what ``req`` holds; images it was receiving pass to a request awaiting them."""
        for key in req.reserved:
            self.mm.abort(key)
            del self.receiving[key]
        for key in req.held:
            self.mm.release(key)
        reserved = list(req.reserved)
        req.reserved.clear()
        req.held.clear()
        req.awaiting.clear()
        for key in reserved:
            heir = next(iter(self._awaiting(key)), None)
            if heir is None:
                continue
            heir.awaiting.discard(key)
            try:
                blocks = self._reserve_one(heir, key)
            except (PoolExhausted, InvalidArgument) as exc:
                self.w.fail(heir.msg.req_id, f"re-reserving an image: {exc}")
                continue
            slot = heir.keys[key]
            self.w.send(slot.encoder, m.FetchMM(heir.msg.req_id, key, self.w.name, blocks))

    def abort(self, req_id: str) -> None:
        for req in [r for r in self.queue if r.msg.req_id == req_id]:
            self.queue.remove(req)
        req = self.admitted.pop(req_id, None)
        if req is not None:
            self._release(req)
        self._unstage(req_id)
