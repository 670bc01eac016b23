# SPDX-License-Identifier: Apache-2.0
"""One bad step fails only the requests in it: their blocks are freed, the error names the
stage and the exception, and the role goes on serving (fake workers, tests/role_fakes.py)."""

from __future__ import annotations

import pytest
import torch
from role_fakes import (
    KV_BLOCK,
    FakeWorker,
    connect,
    deliver,
    encode_msg,
    image,
    image_tokens,
    prefill_msg,
)

from epdrt.runtime import messages as m

N = 8


def once(check=lambda arg: True):
    """A fault predicate true for the first call that ``check`` accepts, then never."""
    fired = []

    def fault(arg) -> bool:
        if fired or not check(arg):
            return False
        fired.append(arg)
        return True

    return fault


def start_sequence(d0: FakeWorker, req_id: str, num_tokens: int = 5) -> None:
    """A sequence prefilled in d0: its prompt's KV in d0's cache, handed to its decode role."""
    slots = d0.kv.reserve(req_id, num_tokens)
    for layer in range(d0.kv.num_layers):
        d0.kv.write(layer, slots, *torch.randn(2, num_tokens, 2, 4))
    d0.decode.start_local(req_id, 3, 4, {})


def test_a_failing_decode_step_fails_its_sequences_and_the_next_step_runs():
    d0 = FakeWorker("d0", {"decode"}, kv_blocks=16, decode_max_batch=2)
    for req_id in ("a", "b", "c"):
        start_sequence(d0, req_id)
    d0.model.fail["decode"] = once()
    d0.decode.step()  # a and b step together (batch of 2) and fail
    error = "d0: decode step failed: RuntimeError: injected decode fault"
    assert d0.failed == [("a", error), ("b", error)]
    assert sorted(d0.kv.sequences()) == ["c"] and list(d0.decode.active) == ["c"]
    assert d0.kv.num_free_blocks == 16 - 2 and d0.decode.headroom == 1  # c: 5 tokens, running
    d0.decode.step()
    (tokens,) = d0.take("cluster", m.Tokens)
    assert [(e.req_id, e.token) for e in tokens.events] == [("c", 3)]


def test_a_failing_prefill_assembly_fails_its_batch_and_frees_the_images(monkeypatch):
    e0, p0 = FakeWorker("e0", {"encode"}), FakeWorker("p0", {"prefill"})
    connect(e0, p0)
    slots = {r: image(i + 1, N, 0, "e0") for i, r in enumerate(("a", "b"))}
    for req_id, slot in slots.items():
        e0.dispatch(encode_msg(req_id, slot))
    e0.step()
    fault = once()

    def assemble(embeds, pages, rows, **kwargs):
        if fault(rows):
            raise ValueError("bad placement")
        return embeds

    monkeypatch.setattr("epdrt.runtime.prefill_role.mm_embed", assemble)
    p0.dispatch(prefill_msg("a", slots["a"]))
    p0.step()
    deliver(e0, p0)
    e0.finish_copy()
    deliver(e0, p0)
    p0.step()
    assert p0.failed == [("a", "p0: prefill step failed: ValueError: bad placement")]
    assert p0.mm.hold_count(slots["a"].key) == 0 and not p0.prefill.admitted
    assert not p0.prefill.running and "a" not in p0.kv  # its KV blocks are freed too
    p0.dispatch(prefill_msg("b", slots["b"]))
    for _ in range(2):
        p0.step()
        deliver(e0, p0)
        while e0.copies:
            e0.finish_copy()
        deliver(e0, p0)
    assert [msg.events[0].req_id for msg in p0.take("cluster", m.Tokens)] == ["b"]
    assert sorted(p0.kv.sequences()) == ["b"]  # staged for d0
    assert p0.kv.num_free_blocks == p0.kv.num_blocks - -(-24 // KV_BLOCK)


@pytest.mark.parametrize("bad", [[2], [1, 3], [1, 2, 3]])
def test_an_encoder_batch_that_raises_is_retried_image_by_image(bad):
    e0 = FakeWorker("e0", {"encode"})
    slots = [image(k, N, 0, "e0") for k in (1, 2, 3)]
    for k, slot in enumerate(slots, 1):
        e0.dispatch(encode_msg(f"r{k}", slot))
    bad_keys = {bytes([k]) for k in bad}
    e0.model.fail["encode"] = lambda keys: bool(bad_keys & set(keys))
    assert e0.encode.step()
    error = "encode step failed: RuntimeError: injected encode fault"
    assert e0.failed == [(f"r{k}", f"e0: {error}") for k in bad]
    for k, slot in enumerate(slots, 1):
        if k in bad:
            assert slot.key not in e0.mm and (f"r{k}", slot.key) not in e0.encode.claims
        else:
            assert torch.equal(e0.mm.tokens(e0.mm.peek(slot.key)), image_tokens(slot.key, N))
            assert e0.encode.claims[(f"r{k}", slot.key)].state.value == "ready"
    assert e0.model.calls["encode"] == 1 + 3 and e0.counters["encode_batches_split"] == 1
    assert e0.counters.get("images_encoded", 0) == 3 - len(bad)


@pytest.mark.parametrize(("sizes", "budget", "batches"), [
    ((4, 4, 4, 4), 8, [2, 2]),  # two per batch
    ((12, 4, 4), 8, [1, 2]),  # a larger image runs alone, then the small ones together
    ((4, 4, 4), 1000, [3]),  # all in one batch
])  # fmt: skip
def test_encoder_batches_are_budgeted_in_image_tokens(sizes, budget, batches):
    e0 = FakeWorker("e0", {"encode"}, mm_blocks=64, encode_max_batch_tokens=budget)
    for k, n in enumerate(sizes, 1):
        e0.dispatch(encode_msg(f"r{k}", image(k, n, 0, "e0")))
    seen = []
    e0.model.fail["encode"] = lambda keys: seen.append(len(keys))  # logs, never fails
    while e0.encode.step():
        pass
    assert seen == batches
