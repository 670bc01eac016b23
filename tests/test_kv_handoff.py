# SPDX-License-Identifier: Apache-2.0
"""The KV hand-off from prefill to decode, role by role: the prefill worker stages a
sequence's KV and says ``KVReady``; the decode worker admits it (room for its whole life),
pulls the blocks into its own cache, starts it when the copy ends and says ``KVPulled``, which
frees the staged blocks. The prefill worker's loop takes no part after ``KVReady``, so a
hand-off never waits for its next batch."""

from types import SimpleNamespace

import pytest
import torch

from epdrt.cache import MMTokenCache, PagedKVCache
from epdrt.runtime import messages as m
from epdrt.runtime.decode_role import DecodeRole
from epdrt.runtime.prefill_role import PrefillRole

LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4


def kv_cache(num_blocks: int, dtype: torch.dtype) -> PagedKVCache:
    return PagedKVCache(LAYERS, HEADS, DIM, BLOCK, num_blocks, dtype)


class FakeWorker:
    """What the roles use of a Worker; copies are held until the test ends them."""

    def __init__(self, kv: PagedKVCache, peers: dict[str, PagedKVCache]) -> None:
        self.name = "d0"
        self.kv, self.mm, self.peers = kv, None, peers
        self.config = SimpleNamespace(decode_max_batch=8, max_num_seqs=256)
        self.sent: list[tuple[str, object]] = []
        self.failed: list[tuple[str, str]] = []
        self.copies: list[tuple] = []
        self.counters: dict[str, float] = {}
        self.roles: list = []

    def peer_kv_cache(self, name: str) -> PagedKVCache:
        return self.peers[name]

    def copy_blocks(self, src, dst, src_blocks, dst_blocks, block_nbytes, then, link) -> None:
        self.copies.append((src, dst, list(src_blocks), list(dst_blocks), block_nbytes, then))

    def finish_copy(self, error: str | None = None) -> None:
        """Ends the oldest copy: the bytes land (unless it failed), then its callback runs."""
        src, dst, src_blocks, dst_blocks, nbytes, then = self.copies.pop(0)
        if error is None:
            src_bytes = src.tensor(torch.uint8, (src.nbytes,))
            dst_bytes = dst.tensor(torch.uint8, (dst.nbytes,))
            for s, d in zip(src_blocks, dst_blocks, strict=True):
                dst_bytes[d * nbytes : (d + 1) * nbytes] = src_bytes[s * nbytes : (s + 1) * nbytes]
        then(error)

    def count(self, name: str, amount: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + amount

    def send(self, peer: str, msg: object, tensors=None) -> None:
        self.sent.append((peer, msg))

    def fail(self, req_id: str, error: str) -> None:
        for role in self.roles:
            role.abort(req_id)
        self.failed.append((req_id, error))


def staged(prefill_kv: PagedKVCache, req_id: str, num_tokens: int) -> m.KVReady:
    """A sequence prefilled into ``prefill_kv`` (random KV) and its KVReady."""
    slots = prefill_kv.reserve(req_id, num_tokens)
    for layer in range(LAYERS):
        k, v = (torch.randn(num_tokens, HEADS, DIM).to(prefill_kv.dtype) for _ in range(2))
        prefill_kv.write(layer, slots, k, v)
    blocks = prefill_kv.block_table(req_id)
    return m.KVReady(req_id, "p0", list(blocks), num_tokens, 7, 4, [])


def decode_side(num_blocks: int = 16, dtype: torch.dtype = torch.float16):
    prefill_kv = kv_cache(32, dtype)
    worker = FakeWorker(kv_cache(num_blocks, dtype), {"p0": prefill_kv})
    role = DecodeRole(worker)
    worker.roles = [role]
    return worker, role, prefill_kv


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, BLOCK, 3 * BLOCK + 1])
def test_the_decoder_pulls_the_kv_and_starts_the_sequence_once_it_is_in(num_tokens, dtype):
    worker, role, prefill_kv = decode_side(dtype=dtype)
    ready = staged(prefill_kv, "r", num_tokens)
    assert role.handle(ready, [])
    role.step()
    (src, dst, src_blocks, dst_blocks, _, _), = worker.copies  # fmt: skip
    assert src is prefill_kv.region and dst is worker.kv.region
    assert src_blocks == ready.blocks and dst_blocks == worker.kv.block_table("r")
    assert "r" not in role.active  # not before its KV is in
    worker.finish_copy()
    assert role.active["r"].last_token == 7 and role.active["r"].generated == 1
    assert worker.sent == [("p0", m.KVPulled("r"))]
    for want, got in zip(prefill_kv.read("r"), worker.kv.read("r"), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_sequence_without_room_waits_and_loses_nothing():
    # 4 blocks: a sequence of 8 tokens and 4 new ones takes 3; the second must wait.
    worker, role, prefill_kv = decode_side(num_blocks=4)
    first, second = staged(prefill_kv, "a", 8), staged(prefill_kv, "b", 8)
    role.handle(first, [])
    role.handle(second, [])
    role.step()
    assert len(worker.copies) == 1 and worker.counters["decode_admission_waits"] == 1
    worker.finish_copy()
    role.abort("a")  # a leaves: its blocks are free again
    role.step()
    assert len(worker.copies) == 1  # b's pull
    worker.finish_copy()
    assert list(role.active) == ["b"]


def test_an_abort_during_the_pull_frees_the_blocks_only_once_the_copy_ends():
    worker, role, prefill_kv = decode_side()
    role.handle(staged(prefill_kv, "r", 9), [])
    role.step()
    free = worker.kv.num_free_blocks
    role.abort("r")
    assert worker.kv.num_free_blocks == free  # the copy still writes into them
    worker.finish_copy()
    assert worker.kv.num_free_blocks == 16 and "r" not in worker.kv
    assert "r" not in role.active and worker.sent == []


def test_a_kv_ready_that_arrives_after_its_abort_is_dropped():
    """The cluster's Abort and the prefill worker's KVReady travel on different sockets; a
    KVReady that comes second must not start a sequence nobody waits for."""
    worker, role, prefill_kv = decode_side()
    role.abort("r")
    role.handle(staged(prefill_kv, "r", 9), [])
    assert not role.step()
    assert worker.copies == [] and worker.kv.num_free_blocks == 16
    assert worker.counters["kv_ready_dropped"] == 1


def test_a_failed_pull_fails_the_request_and_frees_its_blocks():
    worker, role, prefill_kv = decode_side()
    role.handle(staged(prefill_kv, "r", 9), [])
    role.step()
    worker.finish_copy(error="peer region closed")
    assert worker.failed == [("r", "KV transfer from p0 failed: peer region closed")]
    assert worker.kv.num_free_blocks == 16 and "r" not in role.active


@pytest.mark.parametrize("how", ["pulled", "aborted"])
def test_the_prefill_worker_frees_a_staged_sequence_once_pulled_or_aborted(how):
    kv = kv_cache(16, torch.float16)
    mm = MMTokenCache(8, 4, 4, torch.float16)
    worker = SimpleNamespace(kv=kv, mm=mm)
    role = PrefillRole(worker)
    staged(kv, "r", 9)
    role.staged.add("r")
    if how == "pulled":
        assert role.handle(m.KVPulled("r"), [])
    else:
        role.abort("r")
    assert "r" not in kv and kv.num_free_blocks == 16 and not role.staged
    role.handle(m.KVPulled("r"), [])  # a late or repeated answer changes nothing
    assert kv.num_free_blocks == 16
