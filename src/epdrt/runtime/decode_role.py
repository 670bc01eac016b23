# SPDX-License-Identifier: Apache-2.0
"""Decode role: admits sequences into its paged KV cache and runs continuous batching.

Admission budgets blocks for a sequence's whole life (prompt + max_new_tokens), so a running
sequence never meets a full cache; a sequence that does not fit waits (back-pressure). Each step
decodes up to ``decode_max_batch`` sequences together; they join and leave independently.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from epdrt.runtime import messages as m
from epdrt.runtime.stage_model import DecodeInput

if TYPE_CHECKING:
    from epdrt.runtime.worker import Worker


@dataclass
class _Seq:
    req_id: str
    last_token: int
    generated: int
    max_new_tokens: int
    extras: dict[str, torch.Tensor]


class DecodeRole:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        assert worker.kv is not None
        self.kv = worker.kv
        self.alloc_queue: deque[m.KVAlloc] = deque()
        self.local_queue: deque[tuple[str, torch.Tensor, int, int, dict]] = deque()
        self.granted: dict[str, int] = {}  # req -> prompt tokens, KV being written by prefill
        self.active: OrderedDict[str, _Seq] = OrderedDict()
        self.life_blocks: dict[str, int] = {}  # blocks each admitted sequence may ever use
        self.promised = 0  # sum over admitted sequences of life blocks not yet allocated

    # ---- admission -------------------------------------------------------------------------
    def _life_blocks(self, num_tokens: int, max_new_tokens: int) -> int:
        return math.ceil((num_tokens + max_new_tokens) / self.kv.block_size)

    def _try_admit(self, req_id: str, num_tokens: int, max_new_tokens: int) -> bool:
        need = self._life_blocks(num_tokens, max_new_tokens)
        if self.kv.num_free_blocks - self.promised < need:
            return False
        self.kv.reserve(req_id, num_tokens)
        self.life_blocks[req_id] = need
        self.promised += need - len(self.kv.block_table(req_id))
        return True

    def handle(self, msg: object, frames: list[bytes]) -> bool:
        from epdrt.runtime.worker import named_tensors

        if isinstance(msg, m.KVAlloc):
            self.alloc_queue.append(msg)
            return True
        if isinstance(msg, m.StartDecode):
            if self.granted.pop(msg.req_id, None) is None:
                return True  # aborted meanwhile
            extras = named_tensors(msg.extras, frames)
            self.active[msg.req_id] = _Seq(
                msg.req_id, msg.first_token, 1, msg.max_new_tokens, extras
            )
            return True
        return False

    def start_local(
        self, req_id: str, kv: torch.Tensor, first_token: int, max_new_tokens: int, extras: dict
    ) -> None:
        """Starts a sequence prefilled in this worker; ``kv`` is ``[L, 2, n, H, D]``."""
        self.local_queue.append((req_id, kv, first_token, max_new_tokens, extras))

    # ---- work ------------------------------------------------------------------------------
    def step(self) -> bool:
        progressed = False
        while self.alloc_queue:
            alloc = self.alloc_queue[0]
            if not self._try_admit(alloc.req_id, alloc.num_tokens, alloc.max_new_tokens):
                self.w.count("decode_admission_waits")
                break
            self.alloc_queue.popleft()
            self.granted[alloc.req_id] = alloc.num_tokens
            self.w.send(alloc.src, m.KVGranted(alloc.req_id, self.kv.block_table(alloc.req_id)))
            progressed = True
        while self.local_queue:
            req_id, kv, token, max_new, extras = self.local_queue[0]
            if not self._try_admit(req_id, kv.shape[2], max_new):
                break
            self.local_queue.popleft()
            slots = self._slots_of(req_id)
            for layer in range(self.kv.num_layers):
                self.kv.write(layer, slots, kv[layer, 0], kv[layer, 1])
            self.active[req_id] = _Seq(req_id, token, 1, max_new, extras)
            progressed = True
        if self.active:
            self._decode_step()
            progressed = True
        return progressed

    def _slots_of(self, req_id: str) -> torch.Tensor:
        n = self.kv.seq_len(req_id)
        table = torch.tensor(self.kv.block_table(req_id), dtype=torch.int64, device=self.kv.device)
        pos = torch.arange(n, device=self.kv.device)
        return table[pos // self.kv.block_size] * self.kv.block_size + pos % self.kv.block_size

    def _decode_step(self) -> None:
        start = time.perf_counter()
        batch = list(self.active.values())[: self.w.config.decode_max_batch]
        inputs = []
        for seq in batch:
            k, v = self.kv.read(seq.req_id)  # [L, n, H, D] each
            inputs.append(DecodeInput(seq.last_token, torch.stack([k, v], dim=1), seq.extras))
        logits, new_kv = self.w.model.decode(inputs)  # [b, V], [L, 2, b, H, D]
        tokens = torch.argmax(logits, dim=-1).tolist()
        events = []
        eos = self.w.model.spec.eos_token_ids
        for i, (seq, token) in enumerate(zip(batch, tokens)):
            before = len(self.kv.block_table(seq.req_id))
            self.kv.append(seq.req_id, new_kv[:, 0, i : i + 1], new_kv[:, 1, i : i + 1])
            self.promised -= len(self.kv.block_table(seq.req_id)) - before
            seq.last_token = token
            seq.generated += 1
            finished = token in eos or seq.generated >= seq.max_new_tokens
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
        """Frees a sequence's blocks and the part of its budget it never used."""
        self.active.pop(req_id, None)
        self.promised -= self.life_blocks.pop(req_id) - len(self.kv.block_table(req_id))
        self.kv.free(req_id)

    def abort(self, req_id: str) -> None:
        self.alloc_queue = deque(a for a in self.alloc_queue if a.req_id != req_id)
        self.local_queue = deque(x for x in self.local_queue if x[0] != req_id)
        self.granted.pop(req_id, None)
        self.active.pop(req_id, None)
        if req_id in self.kv:
            self._finish(req_id)
