# SPDX-License-Identifier: Apache-2.0
"""The cluster puts a request's tokens in order: prefill sends the first token and decode the
rest, on different sockets, so decode's can arrive first (no workers are launched here)."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from epdrt.runtime import EPDCluster, EPDConfig, Request
from epdrt.runtime import messages as m
from epdrt.runtime.cluster import _Inflight


@pytest.fixture
def cluster(tiny_model_dir):
    c = EPDCluster(tiny_model_dir("llava"), EPDConfig())
    yield c
    c.shutdown()


def _track(cluster: EPDCluster, req_id: str, streamed: list[int]) -> Future:
    future: Future = Future()
    now = time.monotonic()
    request = Request("text", [], 4, id=req_id)
    state = _Inflight(
        request, cluster.pre.prepare(request), future, now, now + 60.0,
        on_token=lambda _, token: streamed.append(token),
    )  # fmt: skip
    cluster._inflight[req_id] = state
    cluster._inflight_tokens += cluster.tokens_of(state)
    return future


def _receive(cluster: EPDCluster, msg: m.Tokens) -> None:
    """What the receiver thread does with a message: take it in under the router's lock;
    results and callbacks run once the lock is let go."""
    with cluster._locked():
        cluster._on_message(msg)


@pytest.mark.parametrize(
    "arrival",
    [[0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0], [1, 2, 3, 0], [0, 2, 1, 3]],
)
def test_tokens_are_delivered_in_order_whatever_order_they_arrive_in(cluster, arrival):
    streamed: list[int] = []
    future = _track(cluster, "r", streamed)
    tokens = [100, 73, 4, 206]
    for i in arrival:
        assert not future.done()  # not before every token is in
        _receive(cluster, m.Tokens(events=[m.TokenEvent("r", i, tokens[i], i == 3)]))
    result = future.result(timeout=0)
    assert result.token_ids == tokens and streamed == tokens
    assert result.error is None and result.ttft_s is not None and result.ttft_s >= 0


def test_a_last_token_that_arrives_first_waits_for_the_earlier_ones(cluster):
    # EOS at index 1: the request resolves once tokens 0 and 1 are in, in order.
    streamed: list[int] = []
    future = _track(cluster, "r", streamed)
    _receive(cluster, m.Tokens(events=[m.TokenEvent("r", 1, 2, True)]))
    assert not future.done()
    _receive(cluster, m.Tokens(events=[m.TokenEvent("r", 0, 9, False)]))
    assert future.result(timeout=0).token_ids == [9, 2] and streamed == [9, 2]
    assert "r" not in cluster._inflight
