# SPDX-License-Identifier: Apache-2.0
"""Scheduling policy: which work a stage runs next, with no model, tensor, cache or socket in
it (as vLLM v1 keeps its scheduler apart from execution).

The runtime's stage roles call it with their real queues (``runtime/encode_role.py``,
``prefill_role.py``, ``decode_role.py``, ``worker.py``); the planner's simulator calls the
same functions with its simulated queues and clock (``planner/simulator.py``), so the two
cannot drift apart. What each caller keeps to itself is its state (caches, claims, clocks)
and how long a batch takes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: How a sequence's KV reaches a decoder that did not prefill it: ``layerwise``, the decoder
#: reserves its blocks as the prefill worker takes the request in, and the prefill pushes each
#: layer into them as it is written (it starts once the blocks are known); ``pull``, the
#: decoder admits it after the prefill and copies the whole KV in.
KV_HANDOFFS = ("layerwise", "pull")

#: The order a worker's roles take turns in, one batch each, skipping a role with no work.
ROLE_ORDER = ("encode", "prefill", "decode")


def encode_batch(image_tokens: Iterable[int], max_images: int, max_tokens: int) -> int:
    """How many of the waiting images (their MM-token counts, in the order they are to be
    encoded) the next encoder batch takes: up to ``max_images``, and up to ``max_tokens``
    tokens in all; the first always (a larger image runs alone)."""
    n = tokens = 0
    for t in image_tokens:
        if n == max_images or (n and tokens + t > max_tokens):
            break
        n, tokens = n + 1, tokens + t
    return n


def prefill_chunks(
    running: Iterable[tuple[K, int]],
    ready: Iterable[tuple[K, int]],
    budget: int,
    start: Callable[[K], bool],
) -> list[tuple[K, int]]:
    """The next prefill step, one flat batch of at most ``budget`` prompt tokens, as
    (request, tokens it computes now): the running prompts' next chunks first (in the order
    they started), then ready requests in order while ``start(request)`` admits them (False:
    back-pressure, nothing after it starts either). ``running`` and ``ready`` give each
    request's prompt tokens still to compute; a prompt longer than what is left of the budget
    computes a chunk now and the rest in later steps.
    """
    batch: list[tuple[K, int]] = []
    for key, remaining in running:
        if budget == 0:
            return batch
        take = min(remaining, budget)
        batch.append((key, take))
        budget -= take
    for key, remaining in ready:
        if budget == 0 or not start(key):
            break
        take = min(remaining, budget)
        batch.append((key, take))
        budget -= take
    return batch


def decode_admissions(waiting: Iterable[T], admit: Callable[[T], bool]) -> list[T]:
    """Sequences the decoder takes in now: in arrival order while ``admit(sequence)`` finds
    room for it (``decode_admit``); the first that does not fit stops the scan (FIFO)."""
    taken = []
    for key in waiting:
        if not admit(key):
            break
        taken.append(key)
    return taken


def decode_admit(
    need: int, free: int, holding: int, max_num_seqs: int, headroom_per_seq: int = 1
) -> str | None:
    """Whether a decoder may take one more sequence, in units of KV room (blocks in the
    runtime, tokens in the simulator): None when it may, else why not (``"max_num_seqs"``:
    ``holding`` sequences already hold a running slot; ``"kv"``: its ``need`` units do not fit
    in ``free`` beside ``headroom_per_seq`` units kept for each holding sequence's next token).
    A sequence whose KV is in the cache already (prefilled there) needs 0."""
    if holding >= max_num_seqs:
        return "max_num_seqs"
    if need and need > free - holding * headroom_per_seq:
        return "kv"
    return None


def growth_preemptions(
    batch: Iterable[tuple[K, int]], held: Mapping[K, int], admitted_at: Mapping[K, int], free: int
) -> list[K]:
    """The running sequences to evict so that a decode step's sequences get the KV room their
    next token needs, given as (sequence, units) in step order, out of ``free`` units: while
    the next one's need does not fit, the newest admitted (``preemption_victim``) is evicted
    and its ``held`` units freed; a sequence evicted before its turn (itself included) gets
    nothing. Returns the evicted in eviction order; the others' needs fit together."""
    running = dict(admitted_at)
    evicted: list[K] = []
    for key, need in batch:
        while key in running and need > free:
            victim = preemption_victim(running)
            del running[victim]
            evicted.append(victim)
            free += held[victim]
        if key in running:
            free -= need
    return evicted


def decode_batch(running: Sequence[T], max_batch: int) -> list[T]:
    """The sequences of the next decode step: the first ``max_batch`` of the running set, which
    the caller keeps in round-robin order (those that stepped go to its end)."""
    return list(running[:max_batch])


def preemption_victim(admitted_at: Mapping[K, int]) -> K:
    """The running sequence to evict when the KV cache is full: the newest admitted (recompute
    it later), so the oldest sequences always progress."""
    return max(admitted_at, key=admitted_at.__getitem__)
