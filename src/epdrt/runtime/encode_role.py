# SPDX-License-Identifier: Apache-2.0
"""Encode role: batches images across requests, caches their tokens, serves prefill's fetches.

Each (request, image) pair the cluster sends is a *claim*: the encoder holds the image's cache
entry once per claim until the claiming prefill fetched it (or said it had the image already,
or the request was aborted). Images already in the cache are not encoded again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from epdrt.errors import EpdrtError, PoolExhausted
from epdrt.runtime import messages as m

if TYPE_CHECKING:
    from epdrt.runtime.worker import Worker


@dataclass
class _Pending:
    """An image waiting to be encoded and the requests that claimed it."""

    num_tokens: int
    tensors: dict[str, torch.Tensor]
    claims: list[str] = field(default_factory=list)


class EncodeRole:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        assert worker.mm is not None
        self.mm = worker.mm
        self.pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self.claims: dict[tuple[str, bytes], float] = {}  # ready claims -> encode seconds
        self.waiting: dict[tuple[str, bytes], m.FetchMM] = {}  # fetches for unready claims

    # ---- messages --------------------------------------------------------------------------
    def handle(self, msg: object, frames: list[bytes]) -> bool:
        from epdrt.runtime.worker import named_tensors

        if isinstance(msg, m.EncodeImages):
            for item in msg.items:
                tensors = named_tensors(item.tensors, frames)
                self._claim(msg.req_id, item.key, item.num_tokens, tensors)
            return True
        if isinstance(msg, m.FetchMM):
            claim = (msg.req_id, msg.key)
            if claim in self.claims:
                self._serve(msg)
            else:
                self.waiting[claim] = msg
            return True
        return False

    def _claim(self, req_id: str, key: bytes, num_tokens: int, tensors: dict) -> None:
        if self.mm.lookup(key) is not None:  # cached: hold it for this claim, no encoding
            self.claims[(req_id, key)] = 0.0
            self.w.count("images_cache_hits")
            return
        pending = self.pending.setdefault(key, _Pending(num_tokens, tensors))
        pending.claims.append(req_id)

    # ---- in-process use by a prefill role in the same worker -------------------------------
    def claim_ready(self, req_id: str, key: bytes) -> float | None:
        """Encode seconds if (req_id, key) is ready (the caller takes over its hold), else None."""
        return self.claims.pop((req_id, key), None)

    # ---- work ------------------------------------------------------------------------------
    def step(self) -> bool:
        if not self.pending:
            return False
        # Back-pressure: encode, oldest first, only what the cache can take now; the rest
        # waits until prefill workers fetch (and so release) earlier images.
        batch: list[tuple[bytes, _Pending]] = []
        room = self.mm.num_free_blocks
        while self.pending and len(batch) < self.w.config.encode_max_batch_images:
            p = next(iter(self.pending.values()))
            need = self.mm.blocks_for(p.num_tokens)
            if need > room:
                break
            room -= need
            batch.append(self.pending.popitem(last=False))
        if not batch:
            self.w.count("encode_cache_waits")
            return False
        start = time.perf_counter()
        try:
            outputs = self.w.model.encode([(key, p.num_tokens, p.tensors) for key, p in batch])
        except Exception as exc:  # a bad image fails its requests, not the worker
            for _, p in batch:
                for req_id in p.claims:
                    self.w.fail(req_id, f"encoding failed: {exc}")
            return True
        seconds = time.perf_counter() - start
        total = sum(p.num_tokens for _, p in batch)
        self.w.count("images_encoded", len(batch))
        self.w.count("encode_batches")
        self.w.count("encode_seconds", seconds)
        for (key, p), tokens in zip(batch, outputs):
            share = seconds * p.num_tokens / total
            if tokens.shape[0] != p.num_tokens:
                for req_id in p.claims:
                    self.w.fail(
                        req_id, f"image produced {tokens.shape[0]} tokens, expected {p.num_tokens}"
                    )
                continue
            try:
                self.mm.put(key, tokens.to(self.mm.dtype), hold=True)
            except (PoolExhausted, EpdrtError) as exc:
                for req_id in p.claims:
                    self.w.fail(req_id, f"encoder cache: {exc}")
                continue
            for _ in p.claims[1:]:  # one hold per claim
                self.mm.lookup(key)
            for req_id in p.claims:
                claim = (req_id, key)
                self.claims[claim] = share
                if claim in self.waiting:
                    self._serve(self.waiting.pop(claim))
        return True

    def _serve(self, fetch: m.FetchMM) -> None:
        """Copies the claimed tokens into the fetcher's cache, tells it, drops the claim."""
        seconds = self.claims.pop((fetch.req_id, fetch.key))
        entry = self.mm.peek(fetch.key)
        digest = self.w.digest(self.mm.tokens(entry)) if fetch.blocks else None

        def done(error: str | None) -> None:  # the claim's hold lasts until the copy is done
            self.mm.release(fetch.key)
            ready = m.MMReady(
                req_id=fetch.req_id, key=fetch.key, encode_s=seconds, error=error,
                digest=None if digest is None else int(digest),
            )  # fmt: skip
            self.w.send(fetch.dst, ready)

        if not fetch.blocks:
            done(None)
            return
        dst = self.w.peer_mm_cache(fetch.dst)
        self.w.copy_blocks(
            self.mm.region, dst.region, list(entry.blocks), list(fetch.blocks),
            self.mm.block_nbytes, done,
        )  # fmt: skip
        self.w.count("mm_bytes_sent", len(fetch.blocks) * self.mm.block_nbytes)

    def abort(self, req_id: str) -> None:
        for claim in [c for c in self.claims if c[0] == req_id]:
            del self.claims[claim]
            self.mm.release(claim[1])
        for claim in [c for c in self.waiting if c[0] == req_id]:
            del self.waiting[claim]
        for key in list(self.pending):
            claims = self.pending[key].claims
            if req_id in claims:
                claims.remove(req_id)
                if not claims:
                    del self.pending[key]
