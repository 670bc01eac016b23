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
