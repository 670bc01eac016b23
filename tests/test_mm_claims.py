# SPDX-License-Identifier: Apache-2.0
"""The encoder <-> prefill MM hand-off, transition by transition, on fake workers with real
small caches (tests/role_fakes.py): every claim and want state, an abort in each, and the
late copy that must never land in blocks given to another image."""

from __future__ import annotations

import pytest
import torch
from role_fakes import (
    FakeWorker,
    connect,
    deliver,
    encode_msg,
    image,
    image_tokens,
    prefill_msg,
)

from epdrt.runtime import messages as m
from epdrt.runtime.mm_claims import (
    CLAIM_TRANSITIONS,
    WANT_TRANSITIONS,
    Claim,
    ClaimEvent,
    IllegalTransition,
    Want,
    WantEvent,
    advance,
)

N = 8  # tokens per image: 2 MM blocks of 4


def held_tokens(w: FakeWorker, key: bytes) -> torch.Tensor:
    return w.mm.tokens(w.mm.peek(key))


def test_a_late_copy_never_lands_in_blocks_given_to_another_image():
    """r1's image A is being copied from e0 when r1 is aborted; r2's image B (from e1) needs
    the prefill's only blocks. B must not get them before A's copy has ended."""
    e0, e1 = FakeWorker("e0", {"encode"}), FakeWorker("e1", {"encode"})
    p0 = FakeWorker("p0", {"prefill"}, mm_blocks=2)  # room for one image
    connect(e0, e1, p0)
    a, b = image(1, N, 0, "e0"), image(2, N, 0, "e1")
    e0.dispatch(encode_msg("r1", a))
    e1.dispatch(encode_msg("r2", b))
    e0.step(), e1.step()
    p0.dispatch(prefill_msg("r1", a))
    p0.step()
    deliver(e0, e1, p0)
    assert len(e0.copies) == 1  # A's copy is in flight
    for w in (e0, p0):
        w.dispatch(m.Abort("r1"))
    p0.dispatch(prefill_msg("r2", b))
    p0.step()
    deliver(e0, e1, p0)
    while e1.copies:  # B's copy (if r2 got blocks) ends first, then A's late one
        e1.finish_copy()
    deliver(e0, e1, p0)
    e0.finish_copy()
    for _ in range(3):
        deliver(e0, e1, p0)
        p0.step()
        while e1.copies:
            e1.finish_copy()
    assert p0.failed == []
    assert [msg.events[0].req_id for msg in p0.take("cluster", m.Tokens)] == ["r2"]
    assert p0.counters["prefill_admission_waits"] >= 1  # r2 waited for A's copy to end
    assert torch.equal(held_tokens(p0, b.key), image_tokens(b.key, N))


# ---- the tables ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "table, states, events",
    [(CLAIM_TRANSITIONS, Claim, ClaimEvent), (WANT_TRANSITIONS, Want, WantEvent)],
    ids=["claim", "want"],
)
def test_advance_follows_the_table_and_raises_off_it(table, states, events):
    for state in states:
        for event in events:
            if (state, event) in table:
                assert advance(table, state, event) is table[(state, event)]
            else:
                with pytest.raises(IllegalTransition, match=f"{event.value} in state"):
                    advance(table, state, event)
    assert not any(s is states.DONE for s, _ in table)  # DONE is terminal


# ---- encoder side ----------------------------------------------------------------------------
A = image(1, N, 0, "e0")


def encoder(mm_blocks: int = 16) -> tuple[FakeWorker, FakeWorker]:
    """An encoder e0 and the prefill p0 whose cache it copies into (fetches come from the test)."""
    e0, p0 = FakeWorker("e0", {"encode"}, mm_blocks=mm_blocks), FakeWorker("p0", {"prefill"})
    connect(e0, p0)
    return e0, p0


def state(e: FakeWorker, req_id: str, slot: m.ImageSlot = A) -> Claim:
    c = e.encode.claims.get((req_id, slot.key))
    return Claim.DONE if c is None else c.state


def fetch(p: FakeWorker, req_id: str, slot: m.ImageSlot = A, blocks=(0, 1)) -> m.FetchMM:
    if blocks:
        p.mm.reserve(slot.key, slot.num_tokens)
    return m.FetchMM(req_id, slot.key, p.name, list(blocks))


def answers(e: FakeWorker) -> list[tuple[str, str | None]]:
    return [(msg.req_id, msg.error) for msg in e.take("p0", m.MMReady)]


def test_claim_queued_then_encoded_ready_then_fetched_sending_then_copied():
    e0, p0 = encoder()
    e0.dispatch(encode_msg("r", A))
    assert state(e0, "r") is Claim.QUEUED and e0.mm.hold_count(A.key) == 0
    e0.step()
    assert state(e0, "r") is Claim.READY and e0.mm.hold_count(A.key) == 1
    e0.dispatch(fetch(p0, "r"))
    assert state(e0, "r") is Claim.SENDING and len(e0.copies) == 1
    e0.finish_copy()
    assert state(e0, "r") is Claim.DONE and e0.mm.hold_count(A.key) == 0
    assert answers(e0) == [("r", None)]
    assert torch.equal(p0.mm.tokens(p0.mm.reserved(A.key)), image_tokens(A.key, N))


def test_claim_of_a_cached_image_is_ready_at_once_and_a_failed_copy_is_answered():
    e0, p0 = encoder()
    e0.mm.put(A.key, image_tokens(A.key, N))
    e0.dispatch(encode_msg("r", A))
    assert state(e0, "r") is Claim.READY and e0.counters["images_cache_hits"] == 1
    e0.dispatch(fetch(p0, "r"))
    e0.finish_copy(error="peer gone")
    assert answers(e0) == [("r", "peer gone")] and e0.mm.hold_count(A.key) == 0


@pytest.mark.parametrize("cached", [False, True])
def test_a_fetch_before_its_claim_waits_early(cached):
    e0, p0 = encoder()
    if cached:
        e0.mm.put(A.key, image_tokens(A.key, N))
    e0.dispatch(fetch(p0, "r"))
    assert state(e0, "r") is Claim.EARLY and answers(e0) == []
    e0.dispatch(encode_msg("r", A))
    if cached:
        assert state(e0, "r") is Claim.SENDING
    else:
        assert state(e0, "r") is Claim.WANTED
        e0.step()
        assert state(e0, "r") is Claim.SENDING  # WANTED --encoded--> SENDING
    e0.finish_copy()
    assert answers(e0) == [("r", None)]


@pytest.mark.parametrize("before", ["early", "queued", "ready", "unheld"])
def test_a_fetch_without_blocks_only_releases_the_claim(before):
    e0, p0 = encoder()
    if before == "early":
        e0.dispatch(fetch(p0, "r", blocks=()))
    e0.dispatch(encode_msg("r", A))
    if before in ("ready", "unheld"):
        e0.step()
    if before == "unheld":
        e0.encode._preempt(e0.mm.num_blocks, None)
        assert state(e0, "r") is Claim.UNHELD
    if before != "early":
        e0.dispatch(fetch(p0, "r", blocks=()))
    assert state(e0, "r") is Claim.DONE and answers(e0) == [("r", None)]
    assert e0.mm.hold_count(A.key) == 0
    e0.step()  # nothing left to encode
    assert e0.model.calls.get("encode", 0) == (1 if before in ("ready", "unheld") else 0)


def test_a_queued_claim_fetched_becomes_wanted_and_is_encoded_first():
    e0, p0 = encoder()
    b = image(2, N, 0, "e0")
    e0.dispatch(encode_msg("r1", A))
    e0.dispatch(encode_msg("r2", b))
    e0.dispatch(fetch(p0, "r2", b))
    assert state(e0, "r2", b) is Claim.WANTED
    assert [c.key for c in e0.encode._batch()] == [b.key, A.key]


def hits_behind(e: FakeWorker, first: m.ImageSlot, *hits: m.ImageSlot) -> None:
    """Claims ``first`` (for r1, not cached), then the cached ``hits`` (r2, r3, ...): their
    holds fill the cache out of FIFO order."""
    for slot in hits:
        e.mm.put(slot.key, image_tokens(slot.key, N))
    e.dispatch(encode_msg("r1", first))
    for i, slot in enumerate(hits, 2):
        e.dispatch(encode_msg(f"r{i}", slot))


def test_a_wanted_image_takes_the_holds_of_younger_claims_not_fetched_yet():
    """The encoder's cache (2 images) holds r2's and r3's images, hits not fetched yet; r1's
    image is fetched: the youngest hold goes, r1's image is encoded and sent. r3's image was
    evicted: its fetch encodes it again."""
    e0, p0 = encoder(mm_blocks=4)
    b, c = image(2, N, 0, "e0"), image(3, N, 0, "e0")
    hits_behind(e0, A, b, c)
    e0.step()
    assert state(e0, "r1") is Claim.QUEUED  # no room: encoded ahead only into free room
    assert e0.counters["encode_cache_waits"] == 1
    e0.dispatch(fetch(p0, "r1"))
    e0.step()
    assert state(e0, "r3", c) is Claim.UNHELD and state(e0, "r2", b) is Claim.READY
    assert state(e0, "r1") is Claim.SENDING and c.key not in e0.mm
    e0.finish_copy()
    e0.dispatch(fetch(p0, "r3", c))
    assert state(e0, "r3", c) is Claim.WANTED  # UNHELD --fetch (evicted)--> WANTED
    e0.step()
    e0.finish_copy()
    assert answers(e0) == [("r1", None), ("r3", None)]
    assert e0.model.calls["encode"] == 2 and e0.counters["mm_holds_preempted"] == 1


def test_a_wanted_image_never_takes_an_older_claims_hold():
    e0, p0 = encoder(mm_blocks=4)
    b, c = image(2, N, 0, "e0"), image(3, N, 0, "e0")
    d = image(4, N, 0, "e0")
    hits_behind(e0, c, A, b)  # r1: c (queued), r2: A, r3: b (held)
    e0.dispatch(fetch(p0, "r1", c, blocks=()))  # r1 needs c no more
    e0.dispatch(encode_msg("r4", d))
    e0.dispatch(fetch(p0, "r4", d))
    e0.step()
    assert state(e0, "r4", d) is Claim.WANTED  # waits: no younger hold
    assert state(e0, "r2") is Claim.READY and "mm_holds_preempted" not in e0.counters


@pytest.mark.parametrize("before", ["early", "wanted", "sending"])
def test_a_second_fetch_is_illegal_and_changes_nothing(before):
    e0, p0 = encoder()
    if before == "early":
        e0.dispatch(fetch(p0, "r"))
    else:
        e0.dispatch(encode_msg("r", A))
        if before == "sending":
            e0.step()
        e0.dispatch(fetch(p0, "r"))
    first = e0.encode.claims[("r", A.key)].fetch
    for blocks in ([5, 6], []):
        with pytest.raises(IllegalTransition):
            e0.encode.handle(m.FetchMM("r", A.key, "p0", blocks), [])
    c = e0.encode.claims[("r", A.key)]
    assert c.state.value == before and c.fetch is first and answers(e0) == []


def test_an_unheld_claim_still_cached_is_sent_without_encoding():
    e0, p0 = encoder()
    e0.dispatch(encode_msg("r", A))
    e0.step()
    e0.encode._preempt(e0.mm.num_blocks, None)
    e0.dispatch(fetch(p0, "r"))
    assert state(e0, "r") is Claim.SENDING and e0.model.calls["encode"] == 1


@pytest.mark.parametrize("before", ["early", "queued", "ready", "unheld", "wanted", "sending"])
def test_abort_in_each_claim_state(before):
    e0, p0 = encoder()
    if before == "early":
        e0.dispatch(fetch(p0, "r"))
    else:
        e0.dispatch(encode_msg("r", A))
    if before in ("ready", "unheld", "sending"):
        e0.step()
    if before == "unheld":
        e0.encode._preempt(e0.mm.num_blocks, None)
    if before in ("wanted", "sending"):
        e0.dispatch(fetch(p0, "r"))
    assert state(e0, "r").value == before
    e0.dispatch(m.Abort("r"))
    if before == "sending":  # the copy writes on: held, answered when it ends
        assert state(e0, "r") is Claim.SENDING and e0.mm.hold_count(A.key) == 1
        assert answers(e0) == []
        e0.finish_copy()
        assert answers(e0) == [("r", None)]
    else:
        fetched = before in ("early", "wanted")
        assert answers(e0) == ([("r", "the request was aborted")] if fetched else [])
    assert state(e0, "r") is Claim.DONE and e0.mm.hold_count(A.key) == 0
    e0.step()
    assert e0.model.calls.get("encode", 0) == (1 if before in ("ready", "unheld", "sending") else 0)
    e0.dispatch(fetch(p0, "r", blocks=()))  # a fetch after the abort is answered too
    assert answers(e0) == [("r", "the request was aborted")]


def test_local_hand_over_from_ready_and_unheld_and_re_encode_when_evicted():
    ep = FakeWorker("ep0", {"encode"}, mm_blocks=2)
    b = image(2, N, 0, "ep0")
    ep.dispatch(encode_msg("r1", A))
    ep.dispatch(encode_msg("r2", b))
    ep.step()
    assert ep.encode.hand_over("r2", [b.key]) is None  # still queued
    assert ep.encode.hand_over("r1", [A.key]) is not None  # READY --hand over-->
    assert state(ep, "r1") is Claim.DONE and ep.mm.hold_count(A.key) == 1  # the caller's
    ep.mm.release(A.key)
    ep.step()
    ep.encode._preempt(ep.mm.num_blocks, None)
    assert state(ep, "r2", b) is Claim.UNHELD
    assert ep.encode.hand_over("r2", [b.key]) is not None  # UNHELD, cached --hand over-->
    ep.mm.release(b.key)
    ep.dispatch(encode_msg("r3", A))
    ep.step()
    ep.encode._preempt(ep.mm.num_blocks, None)
    ep.mm.put(b.key, image_tokens(b.key, N))  # evicts A
    assert ep.encode.hand_over("r3", [A.key]) is None and state(ep, "r3") is Claim.QUEUED
    ep.step()
    assert ep.encode.hand_over("r3", [A.key]) is not None


def test_a_local_request_takes_its_images_all_at_once():
    ep = FakeWorker("ep0", {"encode"}, mm_blocks=4, encode_max_batch_images=1)
    b = image(2, N, N, "ep0")
    ep.dispatch(encode_msg("r", A, b))
    ep.step()
    assert state(ep, "r") is Claim.READY and state(ep, "r", b) is Claim.QUEUED
    assert ep.encode.hand_over("r", [A.key, b.key]) is None
    assert state(ep, "r") is Claim.READY and ep.mm.hold_count(A.key) == 1  # unchanged
    ep.step()
    spent = sum(c.encode_s for c in ep.encode.claims.values())
    assert spent > 0 and ep.encode.hand_over("r", [A.key, b.key]) == pytest.approx(spent)
    assert not ep.encode.claims and ep.mm.hold_count(A.key) == ep.mm.hold_count(b.key) == 1


def test_with_a_local_prefill_the_oldest_requests_image_takes_younger_holds():
    """pd: every request is admitted at once; r1's image cannot be encoded while r2's and
    r3's (cache hits) hold the whole cache: it takes the youngest hold (r3's)."""
    ep = FakeWorker("ep0", {"encode", "prefill"}, mm_blocks=4)
    b, c = image(2, N, 0, "ep0"), image(3, N, 0, "ep0")
    hits_behind(ep, A, b, c)
    ep.encode.step()
    assert [state(ep, r, s) for r, s in (("r1", A), ("r2", b), ("r3", c))] == [
        Claim.READY, Claim.READY, Claim.UNHELD,
    ]  # fmt: skip
    assert c.key not in ep.mm


# ---- prefill side ----------------------------------------------------------------------------
def pair(mm_blocks: int = 16, **config) -> tuple[FakeWorker, FakeWorker]:
    e0 = FakeWorker("e0", {"encode"})
    p0 = FakeWorker("p0", {"prefill"}, mm_blocks=mm_blocks, **config)
    connect(e0, p0)
    return e0, p0


def want(p: FakeWorker, req_id: str, slot: m.ImageSlot = A) -> Want:
    role = p.prefill
    req = role.admitted.get(req_id) or next((r for r in role.queue if r.msg.req_id == req_id), None)
    if req is None:
        owner = role.receiving.get(slot.key)
        return owner.state if owner is not None and owner.req_id == req_id else Want.DONE
    return req.wants[slot.key].state


def submit(e: FakeWorker, p: FakeWorker, req_id: str, *slots: m.ImageSlot) -> None:
    e.dispatch(encode_msg(req_id, *slots))
    p.dispatch(prefill_msg(req_id, *slots))


def test_want_hit_holds_and_releases_the_encoders_claim():
    e0, p0 = pair()
    p0.mm.put(A.key, image_tokens(A.key, N))
    submit(e0, p0, "r", A)
    assert want(p0, "r") is Want.NEW
    p0.prefill._admit()
    assert want(p0, "r") is Want.HELD and p0.mm.hold_count(A.key) == 1
    assert p0.take("e0") == [m.FetchMM("r", A.key, "p0", [])]
    p0.step()  # ready: prefilled, HELD --prefilled--> released
    assert want(p0, "r") is Want.DONE and p0.mm.hold_count(A.key) == 0


@pytest.mark.parametrize("end", ["prefilled", "abort"])
def test_want_receiving_ready_held_then_released(end):
    e0, p0 = pair()
    submit(e0, p0, "r", A)
    e0.step()
    p0.step()
    assert want(p0, "r") is Want.RECEIVING  # RESERVED --fetch sent-->
    deliver(e0, p0)
    e0.finish_copy()
    deliver(e0, p0)
    assert want(p0, "r") is Want.HELD and A.key in p0.mm
    if end == "prefilled":
        p0.step()
        assert p0.take("cluster", m.Tokens)
    else:
        p0.dispatch(m.Abort("r"))
    assert want(p0, "r") is Want.DONE and p0.mm.hold_count(A.key) == 0 and A.key in p0.mm


def test_admission_that_does_not_fit_rolls_back_reservations_and_sends_nothing():
    e0, p0 = pair(mm_blocks=3)  # A fits, A and B do not
    b = image(2, N, N, "e0")
    submit(e0, p0, "r", A, b)
    p0.step()
    assert want(p0, "r") is Want.NEW and want(p0, "r", b) is Want.NEW  # RESERVED --abort-->
    assert p0.mm.num_free_blocks == 3 and p0.outbox == [] and not p0.prefill.receiving
    assert p0.counters["prefill_admission_waits"] == 1


def test_an_image_another_request_receives_is_awaited_then_held():
    e0, p0 = pair()
    submit(e0, p0, "r1", A)
    submit(e0, p0, "r2", A)
    e0.step()
    p0.step()
    assert want(p0, "r1") is Want.RECEIVING and want(p0, "r2") is Want.AWAITING
    assert [f.req_id for f in p0.take("e0")] == ["r1"]
    deliver(e0, p0)  # nothing: the fetch was taken
    e0.dispatch(m.FetchMM("r1", A.key, "p0", list(p0.mm.reserved(A.key).blocks)))
    e0.finish_copy()
    deliver(e0, p0)
    assert want(p0, "r2") is Want.HELD and p0.mm.hold_count(A.key) == 2
    assert state(e0, "r2") is Claim.DONE  # AWAITING --committed--> released its claim


@pytest.mark.parametrize("heir", [False, True])
def test_a_failed_copy_fails_the_request_and_passes_the_blocks_on(heir):
    e0, p0 = pair()
    submit(e0, p0, "r1", A)
    if heir:
        submit(e0, p0, "r2", A)
    e0.step()
    p0.step()
    deliver(e0, p0)
    blocks = list(p0.mm.reserved(A.key).blocks)
    e0.finish_copy(error="copy failed")
    deliver(e0, p0)
    assert p0.failed == [("r1", "p0: receiving an image from e0: copy failed")]
    assert want(p0, "r1") is Want.DONE
    if heir:  # AWAITING --inherit--> RECEIVING, into the same blocks
        assert want(p0, "r2") is Want.RECEIVING and e0.copies[0][3] == blocks
        e0.finish_copy()
        deliver(e0, p0)
        assert want(p0, "r2") is Want.HELD
    else:
        assert p0.mm.num_free_blocks == 16 and A.key not in p0.mm


@pytest.mark.parametrize("answer", ["ready", "error", "expired"])
@pytest.mark.parametrize("heir", [False, True])
def test_an_aborted_receiver_orphans_its_blocks_until_the_answer(answer, heir):
    e0, p0 = pair(request_timeout_s=0.0 if answer == "expired" else 60.0)
    submit(e0, p0, "r1", A)
    if heir:
        submit(e0, p0, "r2", A)
    e0.step()
    p0.step()
    deliver(e0, p0)
    p0.dispatch(m.Abort("r1"))  # the copy is in flight: RECEIVING --abort--> ORPHAN
    assert want(p0, "r1") is Want.ORPHAN and p0.mm.num_free_blocks == 14
    if answer == "expired":  # its encoder died: no answer comes; freed (handed on) later
        p0.step()
        assert p0.counters["mm_orphans_expired"] == 1
    else:
        e0.finish_copy(error=None if answer == "ready" else "copy failed")
        deliver(e0, p0) if not heir else p0.dispatch(e0.take("p0", m.MMReady)[0])
    assert want(p0, "r1") is Want.DONE and p0.failed == []
    if answer == "ready":  # committed: cached for later, held by the heir only
        assert A.key in p0.mm and p0.mm.hold_count(A.key) == (1 if heir else 0)
        assert want(p0, "r2") is (Want.HELD if heir else Want.DONE)
    elif heir:  # the heir fetches into the same blocks
        assert want(p0, "r2") is Want.RECEIVING and p0.mm.num_free_blocks == 14
    else:
        assert p0.mm.num_free_blocks == 16 and A.key not in p0.mm


def test_abort_while_awaiting_or_queued_or_local_frees_nothing_it_does_not_hold():
    e0, p0 = pair(mm_blocks=2)
    b = image(2, N, 0, "e0")
    submit(e0, p0, "r1", A)
    submit(e0, p0, "r2", A)
    submit(e0, p0, "r3", b)
    p0.step()
    assert [want(p0, r, s) for r, s in (("r1", A), ("r2", A), ("r3", b))] == [
        Want.RECEIVING, Want.AWAITING, Want.NEW,
    ]  # fmt: skip
    for req_id in ("r2", "r3"):
        p0.dispatch(m.Abort(req_id))
        assert want(p0, req_id, A if req_id == "r2" else b) is Want.DONE
    assert want(p0, "r1") is Want.RECEIVING and p0.mm.num_free_blocks == 0
    ep = FakeWorker("ep0", {"encode", "prefill"})
    local = image(3, N, 0, "ep0")
    submit(ep, ep, "r4", local)
    ep.prefill.step()
    assert want(ep, "r4", local) is Want.LOCAL
    ep.dispatch(m.Abort("r4"))
    assert want(ep, "r4", local) is Want.DONE and ep.mm.num_free_blocks == 16


def test_a_local_image_is_handed_over_in_process():
    ep = FakeWorker("ep0", {"encode", "prefill"})
    local = image(3, N, 0, "ep0")
    submit(ep, ep, "r", local)
    ep.step()  # encode, then prefill takes the hold over and prefills
    assert [msg.events[0].req_id for msg in ep.take("cluster", m.Tokens)] == ["r"]
    assert ep.mm.hold_count(local.key) == 0 and local.key in ep.mm
