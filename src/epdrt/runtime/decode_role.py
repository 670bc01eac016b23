# SPDX-License-Identifier: Apache-2.0
"""Decode role: admits sequences into its paged KV cache and runs continuous batching.

Admission takes a sequence when its prompt's blocks fit, keeping one block free per running
sequence, and while fewer than ``max_num_seqs`` run; the rest wait (back-pressure). Blocks are
allocated as sequences grow. A step that finds the cache full preempts the newest running
sequence: its blocks are freed and the cluster prefills it again with what it generated
(recompute; ``messages.Preempted``), so the oldest sequences always go on. Each step decodes up
to ``decode_max_batch`` sequences together in one flat batch over the pages (one new token
each, its K/V written into its slot as the layers run); they join and leave independently.

A sequence prefilled in another worker arrives one of two ways (``EPDConfig.kv_handoff``):
``layerwise``, its blocks are reserved here when the prefill worker admits it (``KVReserve``,
answered with ``KVDest``; its prefill starts once they are known) and the prefill worker
pushes each layer into them as it is written; it runs once the last layer has landed
(``KVReady(pushed=True)``). ``pull``, it is admitted once prefilled (``KVReady``) and this
worker copies its KV in.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from epdrt import scheduler
from epdrt.cache.sizing import blocks_for
from epdrt.models.paged import FlatBatch
from epdrt.runtime import messages as m
from epdrt.runtime.sampling import GREEDY, SamplingParams, sample

if TYPE_CHECKING:
    from epdrt.runtime.worker import Worker

#: How many aborted request ids a decode worker remembers (to drop their late KVReady).
ABORTED_REMEMBERED = 65536


@dataclass
class _Seq:
    req_id: str
    last_token: int
    generated: int  # tokens the request has, last_token included (its index + 1)
    max_new_tokens: int
    extras: dict[str, torch.Tensor]
    sampling: SamplingParams
    order: int  # admission order: the newest running sequence is preempted first


class DecodeRole:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        assert worker.kv is not None
        self.kv = worker.kv
        # Sequences waiting for admission, in arrival order: prefilled elsewhere, their KV in
        # the prefill worker's cache (KVReady), or starting their prefill there (KVReserve).
        self.ready_queue: deque[tuple[m.KVReady | m.KVReserve, dict[str, torch.Tensor]]] = deque()
        # Sequences prefilled in this worker, whose KV is already in this cache:
        # (req_id, first token, its index, max_new_tokens, extras, sampling).
        self.local_queue: deque[tuple[str, int, int, int, dict, SamplingParams]] = deque()
        # Admitted sequences whose KV is being copied in from their prefill worker.
        self.pulling: dict[str, tuple[m.KVReady, dict[str, torch.Tensor]]] = {}
        # Aborted while pulling: their blocks are freed once the copy into them ends.
        self.orphans: set[str] = set()
        # Admitted sequences whose KV a prefill worker is pushing into their blocks: the
        # prefill worker's name.
        self.receiving: dict[str, str] = {}
        # Aborted while receiving: (prefill worker, monotonic deadline). Their blocks are
        # freed once that worker says it writes no more (KVReady or KVPushEnded), once it is
        # restarted, or at the deadline (it died).
        self.push_orphans: dict[str, tuple[str, float]] = {}
        self.active: OrderedDict[str, _Seq] = OrderedDict()
        # Requests aborted here, most recent last: a KVReady comes from the prefill worker, an
        # Abort from the cluster, so the Abort can arrive first and the KVReady must then be
        # dropped (its staged blocks are freed by the prefill worker's own Abort).
        self.aborted: OrderedDict[str, None] = OrderedDict()
        self._admissions = itertools.count()

    # ---- admission -------------------------------------------------------------------------
    @property
    def headroom(self) -> int:
        """Blocks admission keeps free, and asks a prefill role sharing the cache to: one per
        running sequence (each one's next token may start a block)."""
        return len(self.active) + len(self.pulling) + len(self.receiving)

    def _try_admit(self, req_id: str, num_tokens: int) -> bool:
        """Takes ``req_id`` into the running set, making room for its prompt's KV unless it
        is in the cache already (prefilled here). False, changing nothing, when
        ``scheduler.decode_admit`` says no (``max_num_seqs``, or the prompt's blocks do not
        fit beside the headroom)."""
        need = 0 if req_id in self.kv else blocks_for(num_tokens, self.kv.block_size)
        why = scheduler.decode_admit(
            need, self.kv.num_free_blocks, self.headroom, self.w.config.max_num_seqs
        )
        if why is not None:
            self.w.count(
                "decode_seq_limit_waits" if why == "max_num_seqs" else "decode_admission_waits"
            )
            return False
        if need:
            self.kv.extend(req_id, num_tokens)
        return True

    def handle(self, msg: object, frames: list[bytes]) -> bool:
        if isinstance(msg, m.KVReady):
            extras = m.named_tensors(msg.extras, frames)
            if msg.pushed:
                self._landed(msg, extras)
            elif msg.req_id in self.aborted:
                self.w.count("kv_ready_dropped")
            else:
                self.ready_queue.append((msg, extras))
            return True
        if isinstance(msg, m.KVReserve):
            if msg.req_id in self.aborted:  # its prefill worker was told too: it sends nothing
                self.w.count("kv_reserve_dropped")
            else:
                self.ready_queue.append((msg, {}))
            return True
        if isinstance(msg, m.KVPushEnded):
            self._push_ended(msg)
            return True
        return False

    def start_local(
        self,
        req_id: str,
        first_token: int,
        max_new_tokens: int,
        extras: dict,
        sampling: SamplingParams = GREEDY,
        first_index: int = 0,
    ) -> None:
        """Starts a sequence prefilled in this worker: its prompt's KV is in this cache, and
        ``first_token`` is its token ``first_index``."""
        self.local_queue.append(
            (req_id, first_token, first_index, max_new_tokens, extras, sampling)
        )

    # ---- work ------------------------------------------------------------------------------
    def step(self) -> bool:
        progressed = False
        self._expire_push_orphans()
        # Each admission takes effect before the next is weighed (the headroom counts it).
        for _ in scheduler.decode_admissions(self.ready_queue, self._admit_remote):
            self.ready_queue.popleft()
            progressed = True
        for _ in scheduler.decode_admissions(self.local_queue, self._admit_local):
            self.local_queue.popleft()
            progressed = True
        if self.active:
            self._decode_step()
            progressed = True
        return progressed

    def _admit_remote(self, item: tuple[m.KVReady | m.KVReserve, dict]) -> bool:
        """Admits a sequence prefilled (or starting its prefill) in another worker: its KV is
        pulled in, or its blocks go to the prefill worker to push into (``KVDest``)."""
        ready, extras = item
        if not self._try_admit(ready.req_id, ready.num_tokens):
            return False
        if isinstance(ready, m.KVReserve):
            self.receiving[ready.req_id] = ready.src
            blocks = self.kv.block_table(ready.req_id)
            self.w.send(ready.src, m.KVDest(ready.req_id, self.w.name, blocks))
        else:
            self._pull(ready, extras)
        return True

    def _admit_local(self, item: tuple) -> bool:
        """Admits a sequence prefilled in this worker (its KV is in this cache)."""
        req_id, token, index, max_new, extras, sampling = item
        if not self._try_admit(req_id, self.kv.seq_len(req_id)):
            return False
        self._run(req_id, token, index, max_new, extras, sampling)
        return True

    def _pull(self, ready: m.KVReady, extras: dict[str, torch.Tensor]) -> None:
        """Copies an admitted sequence's KV blocks from its prefill worker's cache into the
        blocks reserved here; it joins the running batch once the copy ends."""
        req_id = ready.req_id
        self.pulling[req_id] = (ready, extras)
        src = self.w.peer_kv_cache(ready.src)
        self.w.copy_blocks(
            src.region, self.kv.region, list(ready.blocks), self.kv.block_table(req_id),
            self.kv.block_nbytes, lambda error: self._pulled(req_id, error),
            ("kv", ready.src, self.w.name),
        )  # fmt: skip

    def _pulled(self, req_id: str, error: str | None) -> None:
        if req_id in self.orphans:  # aborted meanwhile: nothing writes into its blocks now
            self.orphans.discard(req_id)
            self._finish(req_id)
            return
        ready, extras = self.pulling.pop(req_id)
        if self._transfer_failed(ready, error):
            return
        self.w.send(ready.src, m.KVPulled(req_id))
        self._start(ready, extras)

    def _transfer_failed(self, ready: m.KVReady, error: str | None) -> bool:
        """Fails the sequence (True) when its copy failed or, with ``verify_transfers``, the
        KV in its blocks is not what its prefill worker digested."""
        if error is None and ready.digest is not None:
            k, v = self.kv.read(ready.req_id)
            error = self.w.digest_mismatch(ready.digest, torch.stack([k, v], dim=1))
        if error is None:
            return False
        self.w.fail(ready.req_id, f"KV transfer from {ready.src} failed: {error}")
        return True

    def _landed(self, ready: m.KVReady, extras: dict[str, torch.Tensor]) -> None:
        """A pushed sequence's last layer is in its blocks: it joins the running set."""
        req_id = ready.req_id
        if self.push_orphans.pop(req_id, None) is not None:  # aborted meanwhile
            self.kv.free(req_id)
            return
        if self.receiving.pop(req_id, None) is None:
            self.w.count("kv_ready_dropped")
            return
        if not self._transfer_failed(ready, None):
            self._start(ready, extras)

    def _push_ended(self, msg: m.KVPushEnded) -> None:
        """The prefill worker writes no more into a sequence's blocks, and it will not come:
        they are freed. The cluster knows why already (it aborted the request, the prefill
        worker reported the failure, or the sequence ended at its first token), so nothing is
        reported from here: a second report would race the first."""
        req_id = msg.req_id
        if self.push_orphans.pop(req_id, None) is None and self.receiving.pop(req_id, None) is None:
            return
        self.kv.free(req_id)
        self.w.count("kv_pushes_ended")

    def _expire_push_orphans(self) -> None:
        now = time.monotonic()
        for req_id, (_, deadline) in list(self.push_orphans.items()):
            if now > deadline:
                del self.push_orphans[req_id]
                self.kv.free(req_id)
                self.w.count("kv_push_orphans_expired")

    def peer_restarted(self, name: str) -> None:
        """Worker ``name`` was started again: its old process writes nothing more, so the
        blocks of sequences it was pushing into are freed (the cluster failed those requests
        when it died)."""
        for req_id, (src, _) in list(self.push_orphans.items()):
            if src == name:
                del self.push_orphans[req_id]
                self.kv.free(req_id)
        for req_id in [r for r, src in self.receiving.items() if src == name]:
            del self.receiving[req_id]
            self.kv.free(req_id)

    def _start(self, ready: m.KVReady, extras: dict[str, torch.Tensor]) -> None:
        """Runs a sequence prefilled elsewhere whose KV is now here; counts the seconds from
        the end of its prefill (``kv_handoff_seconds`` over ``kv_handoffs``)."""
        if ready.prefilled_at:
            self.w.count("kv_handoff_seconds", time.monotonic() - ready.prefilled_at)
            self.w.count("kv_handoffs")
        self._run(
            ready.req_id, ready.first_token, ready.first_index, ready.max_new_tokens, extras,
            ready.sampling,
        )  # fmt: skip

    def _run(
        self,
        req_id: str,
        token: int,
        index: int,
        max_new_tokens: int,
        extras: dict[str, torch.Tensor],
        sampling: SamplingParams,
    ) -> None:
        """Puts an admitted sequence, whose KV is in this cache, into the running set."""
        self.active[req_id] = _Seq(
            req_id, token, index + 1, max_new_tokens, extras, sampling, next(self._admissions)
        )

    def _grow(self, batch: list[_Seq]) -> list[_Seq]:
        """Makes room for the next token of each of ``batch``, preempting the newest running
        sequences while the cache is full (``scheduler.growth_preemptions``); returns those of
        ``batch`` still running, each with its new token's slot."""
        needs = [(seq.req_id, self.kv.blocks_needed(seq.req_id, 1)) for seq in batch]
        free = self.kv.num_free_blocks
        if sum(n for _, n in needs) > free:  # else nothing is evicted: skip building the maps
            evicted = scheduler.growth_preemptions(
                needs,
                {k: self.kv.num_blocks_of(k) for k in self.active},
                {k: s.order for k, s in self.active.items()},
                free,
            )
            for req_id in evicted:
                self._preempt(self.active[req_id])
            batch = [seq for seq in batch if seq.req_id in self.active]
        for seq in batch:
            self.kv.extend(seq.req_id, 1)
        return batch

    def _preempt(self, seq: _Seq) -> None:
        """Evicts a running sequence: its blocks are freed, and the cluster prefills it again
        (prompt and generated tokens) to resume it."""
        del self.active[seq.req_id]
        self.kv.free(seq.req_id)
        self.w.send("cluster", m.Preempted(seq.req_id, seq.generated))
        self.w.count("decode_preemptions")

    def _decode_step(self) -> None:
        start = time.perf_counter()
        batch = scheduler.decode_batch(list(self.active.values()), self.w.config.decode_max_batch)
        try:
            # The new tokens' slots; a block when one crosses a boundary.
            batch = self._grow(batch)
            if not batch:
                return
            flat = FlatBatch.build(self.kv, [(seq.req_id, 1) for seq in batch])
            ids = torch.tensor([seq.last_token for seq in batch], device=self.w.device)
            logits = self.w.model.forward(
                self.w.model.embed(ids), flat, [seq.extras for seq in batch]
            )  # [b, V]
            tokens = torch.argmax(logits, dim=-1).tolist()  # greedy rows as they are
            for i, seq in enumerate(batch):
                if not seq.sampling.greedy:
                    tokens[i] = sample(logits[i], seq.sampling, seq.generated)
        except Exception as exc:  # e.g. out of memory: these sequences fail, the worker goes on
            for seq in batch:
                self.w.fail(seq.req_id, f"decode step failed: {type(exc).__name__}: {exc}")
            return
        events = []
        eos = self.w.model.spec.eos_token_ids
        for seq, token in zip(batch, tokens):
            seq.last_token = token
            seq.generated += 1
            finished = seq.sampling.finishes(token, eos) or seq.generated >= seq.max_new_tokens
            events.append(m.TokenEvent(seq.req_id, seq.generated - 1, token, finished))
            if finished:
                self._finish(seq.req_id)
        for seq in batch:  # round robin when more sequences are active than fit a step
            if seq.req_id in self.active:
                self.active.move_to_end(seq.req_id)
        self.w.send("cluster", m.Tokens(events=events))
        self.w.count("decode_steps")
        self.w.count("decode_tokens", len(batch))
        self.w.count("decode_seconds", time.perf_counter() - start)

    def _finish(self, req_id: str) -> None:
        """Frees a sequence's blocks."""
        self.active.pop(req_id, None)
        self.kv.free(req_id)

    def queue_depths(self) -> dict[str, float]:
        """Sequences waiting for admission (their KV in a prefill cache, or prefilled here),
        being pulled or pushed in, and running."""
        return {
            "decode_queued": float(len(self.ready_queue) + len(self.local_queue)),
            "decode_pulling": float(len(self.pulling) + len(self.receiving)),
            "decode_running": float(len(self.active)),
        }

    def abort(self, req_id: str) -> None:
        self.aborted[req_id] = None
        if len(self.aborted) > ABORTED_REMEMBERED:
            self.aborted.popitem(last=False)
        self.ready_queue = deque(x for x in self.ready_queue if x[0].req_id != req_id)
        self.local_queue = deque(x for x in self.local_queue if x[0] != req_id)
        if self.pulling.pop(req_id, None) is not None:
            self.orphans.add(req_id)  # a copy still writes into its blocks
            return
        src = self.receiving.pop(req_id, None)
        if src is not None:  # its prefill worker may still write into its blocks
            deadline = time.monotonic() + self.w.config.request_timeout_s
            self.push_orphans[req_id] = (src, deadline)
            return
        self.active.pop(req_id, None)
        if req_id in self.kv:
            self._finish(req_id)
