# SPDX-License-Identifier: Apache-2.0
"""``epdrt.scheduler``, the batch-forming policy the runtime's roles and the planner's
simulator share, against hand-worked cases."""

from __future__ import annotations

import pytest

from epdrt import scheduler


@pytest.mark.parametrize(
    ("tokens", "max_images", "max_tokens", "want"),
    [
        ([64, 64, 64], 8, 8192, 3),  # everything fits
        ([64, 64, 64], 2, 8192, 2),  # the image limit
        ([64, 64, 64], 8, 130, 2),  # the token limit
        ([9000, 64], 8, 8192, 1),  # a larger image runs alone
        ([], 8, 8192, 0),
    ],
)
def test_encode_batch(tokens, max_images, max_tokens, want):
    assert scheduler.encode_batch(iter(tokens), max_images, max_tokens) == want


def test_prefill_chunks_run_the_started_prompts_first_then_new_ones_within_the_budget():
    running = [("a", 10), ("b", 30)]
    ready = [("c", 5), ("d", 50)]
    started = []
    got = scheduler.prefill_chunks(running, ready, 64, lambda k: started.append(k) or True)
    assert got == [("a", 10), ("b", 30), ("c", 5), ("d", 19)]  # d's first chunk
    assert started == ["c", "d"]


@pytest.mark.parametrize("budget", [1, 7, 16, 100])
def test_prefill_chunks_never_exceed_the_budget(budget):
    got = scheduler.prefill_chunks([("a", 40)], [("b", 8)], budget, lambda k: True)
    assert sum(take for _, take in got) == min(budget, 48)
    assert all(take > 0 for _, take in got)


def test_back_pressure_stops_the_scan_in_order():
    """A request that cannot start (no KV room) holds back the ones behind it (FIFO)."""
    got = scheduler.prefill_chunks([], [("a", 4), ("b", 4), ("c", 4)], 64, lambda k: k != "b")
    assert got == [("a", 4)]


def test_decode_admissions_are_fifo_and_stop_at_the_first_that_does_not_fit():
    room = {"a": True, "b": True, "c": False, "d": True}
    assert scheduler.decode_admissions("abcd", room.__getitem__) == ["a", "b"]


def test_decode_batch_and_preemption_victim():
    assert scheduler.decode_batch(["x", "y", "z"], 2) == ["x", "y"]
    assert scheduler.preemption_victim({"old": 1, "newest": 9, "mid": 5}) == "newest"


@pytest.mark.parametrize(
    ("need", "free", "holding", "max_seqs", "headroom", "want"),
    [
        (4, 10, 0, 8, 1, None),
        (5, 10, 6, 8, 1, "kv"),  # 5 > 10 - 6 kept for the holders' next tokens
        (4, 10, 6, 8, 0, None),
        (0, 0, 3, 8, 1, None),  # prefilled here: its KV is in the cache already
        (0, 100, 8, 8, 1, "max_num_seqs"),
        (10, 40, 2, 8, 16, "kv"),  # the simulator's tokens: a 16-token block per holder
    ],
)
def test_decode_admit(need, free, holding, max_seqs, headroom, want):
    assert scheduler.decode_admit(need, free, holding, max_seqs, headroom) == want


def test_growth_preemptions_evict_the_newest_until_the_step_fits():
    admitted = {"a": 0, "b": 1, "c": 2}
    held = {"a": 5, "b": 3, "c": 2}
    # Room for all three: nothing evicted.
    assert scheduler.growth_preemptions([("a", 1), ("b", 1), ("c", 1)], held, admitted, 3) == []
    # One block short: c (the newest) goes, its 2 blocks pay for a and b.
    assert scheduler.growth_preemptions([("a", 1), ("b", 1), ("c", 1)], held, admitted, 2) == ["c"]
    # Nothing free and c holds too little for both: c, then b; a steps.
    assert scheduler.growth_preemptions(
        [("a", 1), ("b", 1), ("c", 1)], {"a": 5, "b": 3, "c": 0}, admitted, 0
    ) == ["c", "b"]
    # A sequence needing no block never evicts anyone.
    assert scheduler.growth_preemptions([("a", 0), ("b", 0)], held, admitted, 0) == []


def test_growth_preemptions_can_evict_the_sequence_asking():
    # b is the newest: it evicts itself, and a (needing nothing) goes on.
    got = scheduler.growth_preemptions([("a", 0), ("b", 1)], {"a": 4, "b": 0}, {"a": 0, "b": 1}, 0)
    assert got == ["b"]
