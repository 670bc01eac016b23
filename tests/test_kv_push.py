# SPDX-License-Identifier: Apache-2.0
"""The layer-wise KV hand-off (``kv_handoff="layerwise"``), role by role on fake workers: the
prefill worker asks its decoder for blocks as a request is admitted (``KVReserve``), starts
the prefill once they are known (``KVDest``), copies each layer's slice of the blocks a step
writes as soon as the layer is written, and says ``KVReady(pushed=True)`` once every copy has
ended; the decoder then runs the sequence with no copy of its own. Aborts, failed copies,
sequences that end at their first token and a dead prefill worker free every block on both
sides, and the decoder's blocks are never freed while a copy may still write into them."""

from __future__ import annotations

import pytest
import torch
from role_fakes import LAYERS, FakeWorker, connect, deliver, prefill_msg

from epdrt.runtime import messages as m


def pair(**config) -> tuple[FakeWorker, FakeWorker]:
    p0 = FakeWorker("p0", {"prefill"}, kv_handoff="layerwise", **config)
    d0 = FakeWorker("d0", {"decode"}, kv_handoff="layerwise", **config)
    connect(p0, d0)
    return p0, d0


def reserved(p0: FakeWorker, d0: FakeWorker, req: m.PrefillRequest) -> None:
    """``req`` admitted at p0, its blocks reserved at d0 and known to p0 (not started)."""
    p0.dispatch(req)
    p0.step()
    assert p0.model.calls.get("prefill") is None  # not before its decoder's blocks are known
    (reserve,) = p0.take("d0", m.KVReserve)
    d0.dispatch(reserve)
    d0.step()
    (dest,) = d0.take("p0", m.KVDest)
    assert dest.blocks == d0.kv.block_table(req.req_id)
    p0.dispatch(dest)


@pytest.mark.parametrize("prompt,budget", [(9, 4096), (4, 4096), (21, 8)])
def test_each_layer_is_pushed_as_it_is_written_and_the_decoder_starts_after_the_last(
    prompt, budget
):
    p0, d0 = pair(prefill_max_batch_tokens=budget)
    req = prefill_msg("r", prompt=prompt)
    reserved(p0, d0, req)
    steps = -(-prompt // budget)
    for _ in range(steps):
        p0.step()
    # One copy per layer and step, of that layer's slice of the blocks the step wrote.
    assert len(p0.copies) == LAYERS * steps
    spans = [c[6] for c in p0.copies]
    nbytes = p0.kv.layer_nbytes
    assert spans == [(layer * nbytes, nbytes) for _ in range(steps) for layer in range(LAYERS)]
    want = p0.kv.read("r")
    assert p0.take("d0", m.KVReady) == []  # not before every copy has ended
    while p0.copies:
        p0.finish_copy(index=-1)  # in any order
    (ready,) = p0.take("d0", m.KVReady)
    assert ready.pushed and ready.prefilled_at > 0
    assert "r" not in p0.kv and not p0.prefill.pushes  # the staged KV is freed
    d0.dispatch(ready)
    assert d0.decode.active["r"].last_token == p0.model.token and not d0.copies
    for a, b in zip(want, d0.kv.read("r"), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert d0.counters["kv_handoffs"] == 1


def test_an_abort_mid_push_frees_the_decoders_blocks_only_after_the_last_copy():
    p0, d0 = pair()
    reserved(p0, d0, prefill_msg("r", prompt=9))
    p0.step()
    assert p0.copies
    for w in (p0, d0):
        w.dispatch(m.Abort("r"))
    assert d0.kv.num_free_blocks < 64  # a copy may still write into them
    assert p0.take("d0", m.KVPushEnded) == []
    while p0.copies:
        p0.finish_copy()
    assert p0.take("d0") == [m.KVPushEnded("r", "aborted")]
    d0.dispatch(m.KVPushEnded("r", "aborted"))
    assert d0.kv.num_free_blocks == 64 and p0.kv.num_free_blocks == 64
    assert not d0.failed and not d0.decode.active


def test_a_sequence_that_ends_at_its_first_token_gives_its_blocks_back():
    p0, d0 = pair()
    reserved(p0, d0, prefill_msg("r", prompt=9, max_new_tokens=1))
    p0.step()
    while p0.copies:
        p0.finish_copy()
    (ended,) = p0.take("d0", m.KVPushEnded)
    assert ended.error is None
    d0.dispatch(ended)
    assert d0.kv.num_free_blocks == 64 and not d0.failed and p0.kv.num_free_blocks == 64


def test_a_failed_copy_is_reported_once_by_the_prefill_worker_and_frees_both_sides():
    p0, d0 = pair()
    reserved(p0, d0, prefill_msg("r", prompt=9))
    p0.step()
    p0.finish_copy(error="peer region closed")
    while p0.copies:
        p0.finish_copy()
    assert p0.failed == [("r", "p0: KV push to d0 failed: peer region closed")]
    deliver(p0, d0)
    assert not d0.failed  # one report: a second would race the first at the cluster
    assert d0.kv.num_free_blocks == 64 and p0.kv.num_free_blocks == 64


def test_blocks_given_after_the_abort_are_handed_back():
    """The cluster's Abort reaches the prefill worker before the decoder answers: the
    answer (KVDest) is met with KVPushEnded, and the decoder frees the blocks."""
    p0, d0 = pair()
    p0.dispatch(prefill_msg("r", prompt=9))
    p0.step()
    p0.dispatch(m.Abort("r"))
    deliver(p0, d0)  # KVReserve
    d0.step()  # admits it: KVDest
    (dest,) = d0.take("p0", m.KVDest)
    p0.dispatch(dest)
    (ended,) = p0.take("d0", m.KVPushEnded)
    assert "aborted before its KV was pushed" in ended.error
    d0.dispatch(ended)
    assert not d0.failed and d0.counters["kv_pushes_ended"] == 1
    assert d0.kv.num_free_blocks == 64 and p0.kv.num_free_blocks == 64


def test_a_reservation_that_comes_after_the_decoders_abort_is_dropped():
    p0, d0 = pair()
    p0.dispatch(prefill_msg("r", prompt=9))
    p0.step()
    d0.dispatch(m.Abort("r"))
    deliver(p0, d0)
    assert not d0.step() and d0.kv.num_free_blocks == 64
    assert d0.counters["kv_reserve_dropped"] == 1


@pytest.mark.parametrize("how", ["deadline", "restart"])
def test_an_orphan_whose_prefill_worker_went_silent_is_freed(how):
    p0, d0 = pair(request_timeout_s=0.0 if how == "deadline" else 60.0)
    reserved(p0, d0, prefill_msg("r", prompt=9))
    p0.step()
    d0.dispatch(m.Abort("r"))  # and p0 dies: nothing more comes from it
    assert d0.kv.num_free_blocks < 64
    if how == "deadline":
        d0.step()
        assert d0.counters["kv_push_orphans_expired"] == 1
    else:
        d0.decode.peer_restarted("p0")
    assert d0.kv.num_free_blocks == 64


def test_a_restarted_prefill_worker_frees_the_blocks_it_was_pushing_into():
    """The cluster failed those requests when the worker died; the decoder only frees."""
    p0, d0 = pair()
    reserved(p0, d0, prefill_msg("r", prompt=9))
    d0.decode.peer_restarted("p0")
    assert not d0.failed
    assert d0.kv.num_free_blocks == 64 and not d0.decode.receiving


def test_the_decoder_reserves_in_order_and_within_its_room():
    """Reservations are admitted like KVReady: in order, within the cache beside the
    headroom; a request whose blocks are not known yet does not start prefilling."""
    p0, d0 = pair(kv_blocks=6)  # room for one 9-token prompt (3 blocks) and its headroom
    for i in range(2):
        p0.dispatch(prefill_msg(f"r{i}", prompt=9))
    p0.step()
    deliver(p0, d0)
    d0.step()
    assert [d.req_id for d in d0.take("p0", m.KVDest)] == ["r0"]
    assert d0.counters["decode_admission_waits"] >= 1
    assert p0.counters["prefill_kv_dest_waits"] >= 1
