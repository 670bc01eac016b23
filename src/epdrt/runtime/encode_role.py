# SPDX-License-Identifier: Apache-2.0
"""Encode role: batches images across requests, caches their tokens, serves prefill's fetches.

Each (request, image) pair the cluster sends is a *claim* (``mm_claims.Claim``): encoded (or
found cached), the image is held for the claim until its prefill fetches it. Images already
cached are not encoded again. Images a prefill has fetched (reserved blocks for) are encoded
first and may take the holds of younger claims no prefill has fetched yet (youngest first), so
a prefill never waits for room that later requests' images hold (no hold-and-wait between the
caches); such a claim looks its image up again when fetched and re-encodes it if evicted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from epdrt import scheduler
from epdrt.errors import EpdrtError
from epdrt.runtime import messages as m
from epdrt.runtime.mm_claims import CLAIM_TRANSITIONS, Claim, ClaimEvent, advance

if TYPE_CHECKING:
    from epdrt.runtime.worker import Worker

#: Aborted requests remembered so that a fetch arriving after the abort is answered (with an
#: error) instead of waiting for a claim that will never come.
ABORTED_REMEMBERED = 4096


@dataclass
class _Claim:
    """One request's claim on one image: its encoder inputs (kept until the claim ends, for a
    re-encode after an eviction), the prefill's fetch once it came, encode seconds spent."""

    req_id: str
    key: bytes
    num_tokens: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Claim = Claim.NEW
    fetch: m.FetchMM | None = None
    encode_s: float = 0.0

    def advance(self, event: ClaimEvent) -> None:
        self.state = advance(CLAIM_TRANSITIONS, self.state, event)


class EncodeRole:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        assert worker.mm is not None
        self.mm = worker.mm
        self.claims: dict[tuple[str, bytes], _Claim] = {}  # live claims, oldest first
        self.aborted: OrderedDict[str, None] = OrderedDict()

    # ---- messages --------------------------------------------------------------------------
    def handle(self, msg: object, frames: list[bytes]) -> bool:
        if isinstance(msg, m.EncodeImages):
            # All frames are decoded first: a malformed message changes nothing.
            inputs = [m.named_tensors(item.tensors, frames) for item in msg.items]
            for item, tensors in zip(msg.items, inputs):
                self._claim(msg.req_id, item.key, item.num_tokens, tensors)
            return True
        if isinstance(msg, m.FetchMM):
            self._fetch(msg)
            return True
        return False

    def _claim(
        self, req_id: str, key: bytes, num_tokens: int, tensors: dict[str, torch.Tensor]
    ) -> None:
        c = self.claims.setdefault((req_id, key), _Claim(req_id, key))
        c.num_tokens, c.tensors = num_tokens, tensors
        if c.fetch is not None and not c.fetch.blocks:  # fetched first, only to release
            c.advance(ClaimEvent.RELEASE)
            self._answer(c, None)
            return
        if self.mm.lookup(key) is not None:  # cached: held for this claim, no encoding
            self.w.count("images_cache_hits")
            c.advance(ClaimEvent.CLAIM_CACHED)
        else:
            c.advance(ClaimEvent.CLAIM)
        if c.state is Claim.SENDING:
            self._send(c)

    def _fetch(self, fetch: m.FetchMM) -> None:
        c = self.claims.get((fetch.req_id, fetch.key))
        if c is None:
            if fetch.req_id in self.aborted:
                self._reply(fetch, 0.0, "the request was aborted")
                return
            c = self.claims[(fetch.req_id, fetch.key)] = _Claim(fetch.req_id, fetch.key)
        # Each branch advances before it changes anything: a fetch the claim's state does not
        # allow (a second one) raises IllegalTransition and leaves the claim as it was.
        before = c.state
        if before in (Claim.NEW, Claim.EARLY):  # the claim is still on its way (EARLY)
            c.advance(ClaimEvent.FETCH)
            c.fetch = fetch
        elif not fetch.blocks:  # the prefill has the image already
            c.advance(ClaimEvent.RELEASE)
            c.fetch = fetch
            if before is Claim.READY:
                self.mm.release(c.key)
            self._answer(c, None)
        elif before is Claim.READY or (before is Claim.UNHELD and c.key in self.mm):
            c.advance(ClaimEvent.FETCH_CACHED)
            c.fetch = fetch
            if before is Claim.UNHELD:
                self.mm.lookup(c.key)
            self._send(c)
        else:
            c.advance(ClaimEvent.FETCH)  # to encode, before any image not fetched yet
            c.fetch = fetch

    # ---- in-process use by a prefill role in the same worker -------------------------------
    def hand_over(self, req_id: str, keys: list[bytes]) -> float | None:
        """Hands the holds of ``req_id``'s images ``keys`` to the caller once all are cached,
        all at once (a request never holds some of its images while waiting for the others);
        returns their encode seconds, or None (nothing changes, except that a claim whose
        image was evicted is queued to be encoded again)."""
        claims = [self.claims.get((req_id, key)) for key in keys]
        ready = True
        for c in claims:
            if c is None or c.state not in (Claim.READY, Claim.UNHELD):
                ready = False
            elif c.state is Claim.UNHELD and c.key not in self.mm:
                c.advance(ClaimEvent.EVICTED)
                ready = False
        if not ready:
            return None
        seconds = 0.0
        for c in claims:
            assert c is not None
            if c.state is Claim.UNHELD:
                self.mm.lookup(c.key)
            c.advance(ClaimEvent.HAND_OVER)
            del self.claims[(req_id, c.key)]
            seconds += c.encode_s
        return seconds

    # ---- work ------------------------------------------------------------------------------
    def step(self) -> bool:
        batch = self._batch()
        if not batch:
            return False
        start = time.perf_counter()
        outputs = self._encode(batch)
        seconds = time.perf_counter() - start
        total = sum(c.num_tokens for c in batch)
        self.w.count("encode_batches")
        self.w.count("encode_seconds", seconds)
        for first, tokens in zip(batch, outputs):
            self._cache(first, tokens, seconds * first.num_tokens / total)
        return True

    def _batch(self) -> list[_Claim]:
        """One claim per image to encode: fetched images first, then the others oldest first,
        up to ``encode_max_batch_images`` and ``encode_max_batch_tokens`` (one larger image
        runs alone), and only as many as the cache can take now.

        NOTE: a fetched image takes the room it needs from the holds of younger claims not
        fetched yet; the rest waits for copies in flight to end. An image not fetched yet is
        encoded ahead only into room no claim holds (back-pressure). With a prefill role in
        this worker every request is admitted at once and every image is wanted: each may take
        room from younger claims' holds, and the prefill takes a request's holds over only
        when all its images are cached (``hand_over``).
        """
        todo: dict[bytes, _Claim] = {}
        for state in (Claim.WANTED, Claim.QUEUED):
            for c in self.claims.values():
                if c.state is state:
                    todo.setdefault(c.key, c)
        cfg = self.w.config
        order = list(todo.values())
        n = scheduler.encode_batch(
            (c.num_tokens for c in order), cfg.encode_max_batch_images, cfg.encode_max_batch_tokens
        )
        batch: list[_Claim] = []
        taken = 0  # blocks the batch will take
        for c in order[:n]:
            need = self.mm.blocks_for(c.num_tokens)
            if c.state is Claim.WANTED or self.w.prefill is not None:
                self._preempt(taken + need, c)
            if self.mm.num_free_blocks - taken < need:
                break
            taken += need
            batch.append(c)
        if todo and not batch:
            self.w.count("encode_cache_waits")
        return batch

    def _preempt(self, blocks: int, wanted: _Claim | None) -> None:
        """Gives up holds of claims younger than ``wanted`` (None: of any claim) and not
        fetched yet, youngest first, until ``blocks`` are free.

        NOTE: only younger ones: the oldest wanted image can always get room, and an older
        request's image, likely fetched sooner, is not evicted for a younger one's.
        """
        for c in reversed(list(self.claims.values())):
            if self.mm.num_free_blocks >= blocks or c is wanted:
                return
            if c.state is Claim.READY:
                c.advance(ClaimEvent.PREEMPT)
                self.mm.release(c.key)
                self.w.count("mm_holds_preempted")

    def _encode(self, batch: list[_Claim]) -> list[torch.Tensor | str]:
        """Each image's tokens ``[num_tokens, hidden]``, or why it failed. A batch that raises
        is encoded again image by image, so only the bad images fail."""
        try:
            return list(self.w.model.encode([(c.key, c.num_tokens, c.tensors) for c in batch]))
        except Exception as exc:
            if len(batch) == 1:
                return [f"encode step failed: {type(exc).__name__}: {exc}"]
        self.w.count("encode_batches_split")
        return [out for c in batch for out in self._encode([c])]

    def _cache(self, first: _Claim, tokens: torch.Tensor | str, seconds: float) -> None:
        """Caches an encoded image, held once per claim waiting for it, and sends it to the
        claims already fetched; or fails their requests."""
        key = first.key
        waiting = [
            c for c in self.claims.values()
            if c.key == key and c.state in (Claim.QUEUED, Claim.WANTED)
        ]  # fmt: skip
        error = tokens if isinstance(tokens, str) else None
        if isinstance(tokens, torch.Tensor):
            if tokens.shape[0] != first.num_tokens:
                error = f"image produced {tokens.shape[0]} tokens, expected {first.num_tokens}"
            else:
                try:
                    self.mm.put(key, tokens.to(self.mm.dtype), hold=True)
                except EpdrtError as exc:
                    error = f"encoder cache: {exc}"
        if error is not None:
            for c in waiting:
                self.w.fail(c.req_id, error)
            return
        self.w.count("images_encoded")
        for i, c in enumerate(waiting):
            if i:  # one hold per claim
                self.mm.lookup(key)
            c.encode_s = seconds
            c.advance(ClaimEvent.ENCODED)
            if c.state is Claim.SENDING:
                self._send(c)

    def _send(self, c: _Claim) -> None:
        """Copies a held image into the blocks its prefill reserved; the hold lasts until the
        copy ends, then the prefill is told (MMReady)."""
        assert c.fetch is not None
        fetch = c.fetch
        entry = self.mm.peek(c.key)
        digest = self.w.digest(self.mm.tokens(entry))

        def done(error: str | None) -> None:
            c.advance(ClaimEvent.COPIED)
            self.mm.release(c.key)
            self._answer(c, error, None if digest is None else int(digest))

        dst = self.w.peer_mm_cache(fetch.dst)
        self.w.copy_blocks(
            self.mm.region, dst.region, list(entry.blocks), list(fetch.blocks),
            self.mm.block_nbytes, done, ("mm", self.w.name, fetch.dst),
        )  # fmt: skip

    def _answer(self, c: _Claim, error: str | None, digest: int | None = None) -> None:
        """Ends a fetched claim: its prefill gets the MMReady."""
        assert c.fetch is not None and c.state is Claim.DONE
        del self.claims[(c.req_id, c.key)]
        self._reply(c.fetch, c.encode_s, error, digest)

    def _reply(
        self, fetch: m.FetchMM, encode_s: float, error: str | None, digest: int | None = None
    ) -> None:
        ready = m.MMReady(fetch.req_id, fetch.key, encode_s, error, digest)
        self.w.send(fetch.dst, ready)

    def queue_depths(self) -> dict[str, float]:
        """Images waiting to be encoded (one per distinct image) and claims being sent."""
        waiting = {c.key for c in self.claims.values() if c.state in (Claim.QUEUED, Claim.WANTED)}
        sending = sum(c.state is Claim.SENDING for c in self.claims.values())
        return {"encode_queued_images": float(len(waiting)), "encode_sending": float(sending)}

    def abort(self, req_id: str) -> None:
        """Ends ``req_id``'s claims: holds dropped, fetches answered with an error, except a
        copy in flight, answered when it ends."""
        self.aborted[req_id] = None
        if len(self.aborted) > ABORTED_REMEMBERED:
            self.aborted.popitem(last=False)
        for c in [c for c in self.claims.values() if c.req_id == req_id]:
            before = c.state
            c.advance(ClaimEvent.ABORT)
            if c.state is Claim.SENDING:
                continue
            del self.claims[(req_id, c.key)]
            if before is Claim.READY:
                self.mm.release(c.key)
            if c.fetch is not None:
                self._reply(c.fetch, 0.0, "the request was aborted")
