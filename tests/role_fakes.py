# SPDX-License-Identifier: Apache-2.0
"""Stage roles on fake workers: real small caches, messages delivered by the test, copies held
in flight until the test ends them (in any order), models that tests can make fail."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from epdrt.cache import MMTokenCache, PagedKVCache
from epdrt.runtime import messages as m
from epdrt.runtime.decode_role import DecodeRole
from epdrt.runtime.encode_role import EncodeRole
from epdrt.runtime.prefill_role import PrefillRole

HIDDEN, MM_BLOCK = 8, 4
LAYERS, HEADS, DIM, KV_BLOCK = 2, 2, 4, 4
VOCAB = 32


def image_tokens(key: bytes, num_tokens: int) -> torch.Tensor:
    """The encoder output of image ``key``: ``[num_tokens, HIDDEN]`` float32, distinct per key."""
    seed = int.from_bytes(key, "little") % 2**31
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


class FakeModel:
    """Encode gives ``image_tokens``; a forward writes random K/V into the batch's slots and
    gives logits whose argmax is ``token``. ``fail[stage]`` (a predicate on the call's input:
    image keys for "encode", the ``FlatBatch`` for "prefill" and "decode") makes a call raise."""

    def __init__(self, hidden: int = HIDDEN, vocab: int = VOCAB, token: int = 3) -> None:
        self.hidden, self.vocab, self.token = hidden, vocab, token
        self.spec = SimpleNamespace(eos_token_ids=[])
        self.fail: dict[str, object] = {}
        self.calls: dict[str, int] = {}

    def _call(self, stage: str, arg: object) -> None:
        self.calls[stage] = self.calls.get(stage, 0) + 1
        check = self.fail.get(stage)
        if check is not None and check(arg):
            raise RuntimeError(f"injected {stage} fault")

    def encode(self, items):
        self._call("encode", [key for key, _, _ in items])
        return [image_tokens(key, n) for key, n, _ in items]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], self.hidden)

    def forward(self, embeds: torch.Tensor, batch, extras) -> torch.Tensor:
        self._call("decode" if batch.is_decode else "prefill", batch)
        assert embeds.shape == (batch.num_tokens, self.hidden)
        kv = batch.cache
        for layer in range(kv.num_layers):
            k, v = (torch.randn(batch.num_tokens, kv.num_kv_heads, kv.head_dim) for _ in "kv")
            kv.write(layer, batch.slot_mapping, k.to(kv.dtype), v.to(kv.dtype))
            if batch.on_layer_written is not None:
                batch.on_layer_written(layer)
        logits = torch.zeros(len(batch.seq_ids), self.vocab)
        logits[:, self.token] = 1.0
        return logits

    def decode_extras(self, extras):
        return {}


class FakeWorker:
    """What the roles use of a Worker. ``outbox``: messages sent, (peer, msg); ``copies``:
    copies in flight; ``failed``: (request, error) reported to the cluster."""

    def __init__(
        self, name: str, roles: set[str], *, mm_blocks: int = 16, kv_blocks: int = 64, **config
    ) -> None:
        self.name = name
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(
            encode_max_batch_images=8, encode_max_batch_tokens=8192, prefill_max_batch_tokens=4096,
            decode_max_batch=8, max_num_seqs=256, kv_handoff="pull",
            verify_transfers=False, request_timeout_s=60.0,
        )  # fmt: skip
        vars(self.config).update(config)
        self.model = FakeModel()
        self.mm = MMTokenCache(HIDDEN, MM_BLOCK, mm_blocks, torch.float32)
        self.kv = PagedKVCache(LAYERS, HEADS, DIM, KV_BLOCK, kv_blocks, torch.float32)
        self.outbox: list[tuple[str, object]] = []
        self.failed: list[tuple[str, str]] = []
        self.copies: list[tuple] = []
        self.counters: dict[str, float] = {}
        self.peers: dict[str, FakeWorker] = {}
        self.encode = EncodeRole(self) if "encode" in roles else None
        self.prefill = PrefillRole(self) if "prefill" in roles else None
        self.decode = DecodeRole(self) if "decode" in roles else None
        self.roles = [r for r in (self.encode, self.prefill, self.decode) if r is not None]

    # ---- Worker's interface ----------------------------------------------------------------
    def peer_mm_cache(self, name: str) -> MMTokenCache:
        return self.peers[name].mm

    def peer_kv_cache(self, name: str) -> PagedKVCache:
        return self.peers[name].kv

    def copy_blocks(
        self, src, dst, src_blocks, dst_blocks, block_nbytes, then, link, span=None
    ) -> None:
        self.copies.append((src, dst, list(src_blocks), list(dst_blocks), block_nbytes, then, span))

    def finish_copies(self, wait_s: float) -> None:
        """Copies end only when the test says so."""

    def count(self, name: str, amount: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + amount

    def send(self, peer: str, msg: object, tensors=None) -> None:
        self.outbox.append((peer, msg))

    def fail(self, req_id: str, error: str) -> None:
        for role in self.roles:
            role.abort(req_id)
        self.failed.append((req_id, f"{self.name}: {error}"))

    def digest(self, tensor: torch.Tensor) -> None:
        return None

    def digest_mismatch(self, sent: int | None, received: torch.Tensor) -> str | None:
        return None

    # ---- test controls ---------------------------------------------------------------------
    def dispatch(self, msg: object) -> None:
        if isinstance(msg, m.Abort):
            for role in self.roles:
                role.abort(msg.req_id)
            return
        assert any(role.handle(msg, []) for role in self.roles), msg

    def step(self) -> None:
        for role in self.roles:
            role.step()

    def finish_copy(self, index: int = 0, error: str | None = None) -> None:
        """Ends copy ``index`` (0: the oldest): its bytes land unless it failed, then its
        callback runs."""
        src, dst, src_blocks, dst_blocks, nbytes, then, span = self.copies.pop(index)
        offset, length = span or (0, nbytes)
        if error is None:
            src_bytes = src.tensor(torch.uint8, (src.nbytes,))
            dst_bytes = dst.tensor(torch.uint8, (dst.nbytes,))
            for s, d in zip(src_blocks, dst_blocks, strict=True):
                at_s, at_d = s * nbytes + offset, d * nbytes + offset
                dst_bytes[at_d : at_d + length] = src_bytes[at_s : at_s + length]
        then(error)

    def take(self, peer: str | None = None, kind: type | None = None) -> list[object]:
        """Removes and returns the messages sent (to ``peer``, of type ``kind``)."""
        taken = [
            (p, msg) for p, msg in self.outbox
            if (peer is None or p == peer) and (kind is None or isinstance(msg, kind))
        ]  # fmt: skip
        self.outbox = [x for x in self.outbox if x not in taken]
        return [msg for _, msg in taken]


def connect(*workers: FakeWorker) -> None:
    for w in workers:
        w.peers = {p.name: p for p in workers}


def deliver(*workers: FakeWorker) -> int:
    """Delivers every message between ``workers`` (not those to the cluster) until none is
    left; returns how many."""
    by_name = {w.name: w for w in workers}
    delivered = 0
    while True:
        moving = [(w, p, msg) for w in workers for p, msg in w.outbox if p in by_name]
        if not moving:
            return delivered
        for w, peer, msg in moving:
            w.outbox.remove((peer, msg))
            by_name[peer].dispatch(msg)
            delivered += 1


def image(key: int, num_tokens: int, start: int, encoder: str) -> m.ImageSlot:
    return m.ImageSlot(bytes([key]), num_tokens, start, encoder)


def encode_msg(req_id: str, *slots: m.ImageSlot) -> m.EncodeImages:
    return m.EncodeImages(req_id, [m.EncodeItem(s.key, s.num_tokens, []) for s in slots])


def prefill_msg(
    req_id: str, *slots: m.ImageSlot, prompt: int = 24, max_new_tokens: int = 4
) -> m.PrefillRequest:
    return m.PrefillRequest(req_id, list(range(prompt)), list(slots), max_new_tokens, "d0", [])
