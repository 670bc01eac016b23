# SPDX-License-Identifier: Apache-2.0
"""The router: admission by budget with a bounded queue, cancellation that frees every
worker's blocks, callbacks and sends that never run under its lock."""

from __future__ import annotations

import threading
import time

import pytest
from model_utils import make_image

from epdrt.runtime import EPDCluster, EPDConfig, Request
from epdrt.runtime import messages as m
from epdrt.runtime.channel import ChannelError
from epdrt.runtime.outbox import Outbox

TIMEOUT_S = 120.0


def _blocks_in_use(cluster: EPDCluster) -> dict[str, float]:
    return {
        f"{w}.{k}": v
        for w, s in cluster.worker_stats().items()
        for k, v in s.items()
        if k.endswith("_blocks_in_use")
    }


def test_admission_budget_queues_then_rejects_beyond_the_queue(tiny_model_dir):
    """One request in the workers at a time, two waiting: of six submitted together, three
    are rejected at once with a clear error and the other three complete in order."""
    config = EPDConfig(
        mode="pd", max_inflight_requests=1, max_queued_requests=2, request_timeout_s=TIMEOUT_S
    )
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        requests = [Request(f"text number {i}", [], 48) for i in range(6)]
        futures = [cluster.submit(r) for r in requests]
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    rejected = [r for r in results if r.error is not None]
    assert len(rejected) >= 3
    assert all("the router's queue is full" in r.error for r in rejected)
    served = [r for r in results if r.error is None]
    assert [r.id for r in served] == [r.id for r in requests[: len(served)]]
    assert all(len(r.token_ids) > 0 for r in served)
    # Admitted one at a time: each started after the one before had finished.
    ends = [r.e2e_s for r in served]
    firsts = [r.ttft_s for r in served]
    assert all(firsts[i + 1] >= ends[i] for i in range(len(served) - 1))
    assert set(_blocks_in_use(cluster).values()) == {0.0}, _blocks_in_use(cluster)


def test_token_budget_admits_a_large_request_alone(tiny_model_dir):
    config = EPDConfig(mode="aggregated", max_inflight_tokens=8, request_timeout_s=TIMEOUT_S)
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        results = cluster.generate([Request("a prompt of many tokens", [], 5) for _ in range(3)])
    assert all(r.error is None and len(r.token_ids) == 5 for r in results)


@pytest.mark.parametrize("how", ["cancel", "abort"])
@pytest.mark.parametrize("mode", ["epd", "pd"])
def test_cancelling_frees_the_request_in_every_worker(tiny_model_dir, mode, how):
    """A request cancelled mid-decode (and one cancelled while queued) ends at once; every
    worker ends with no block in use and later requests are served."""
    config = EPDConfig(mode=mode, max_inflight_requests=1, request_timeout_s=TIMEOUT_S)
    ph = "<image>"
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        started = threading.Event()
        long = Request(f"USER: {ph} describe", [make_image(40, 30, 1)], 400)
        running = cluster.submit(long, on_token=lambda _, token: started.set())
        waiting = Request("waits behind it", [], 4)
        queued = cluster.submit(waiting)
        assert started.wait(TIMEOUT_S)
        if how == "cancel":
            assert queued.cancel() and running.cancel()
        else:
            assert not cluster.abort("no-such-request")
            assert cluster.abort(waiting.id) and cluster.abort(long.id)
            assert running.result(TIMEOUT_S).error == "aborted"
            assert queued.result(TIMEOUT_S).error == "aborted"
        after = cluster.generate([Request(f"{ph} next", [make_image(30, 30, 2)], 4)])
        assert after[0].error is None and len(after[0].token_ids) == 4
    assert set(_blocks_in_use(cluster).values()) == {0.0}, _blocks_in_use(cluster)


def test_on_token_may_call_back_into_the_cluster(tiny_model_dir):
    """Callbacks run off the router's lock: one that calls the cluster does not deadlock."""
    seen: list[int] = []
    config = EPDConfig(mode="aggregated", request_timeout_s=TIMEOUT_S)
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:

        def on_token(req_id: str, token: int) -> None:
            seen.append(cluster.messages_received().get("Tokens", 0))

        future = cluster.submit(Request("call back", [], 6), on_token=on_token)
        result = future.result(timeout=30)
    assert result.error is None and len(seen) == len(result.token_ids) == 6


class StuckChannel:
    """A channel whose sends to "slow" block until released; others are recorded."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sent: list[tuple[str, object]] = []

    def send(self, peer: str, msg: object, tensors=()) -> None:
        if peer == "slow" and not self.release.wait(10):
            raise ChannelError("slow did not accept a message in time")
        self.sent.append((peer, msg))


def test_outbox_never_waits_for_a_stuck_peer():
    channel = StuckChannel()
    outbox = Outbox(channel)  # type: ignore[arg-type]
    t0 = time.monotonic()
    outbox.post("slow", m.Abort("a"))
    outbox.post("slow", m.Abort("b"))
    for i in range(5):
        outbox.post("fast", m.Abort(str(i)))
    assert time.monotonic() - t0 < 0.5  # posting never blocks
    deadline = time.monotonic() + 5
    while len(channel.sent) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [msg.req_id for _, msg in channel.sent] == ["0", "1", "2", "3", "4"]
    channel.release.set()
    outbox.close(5)
    assert [msg.req_id for peer, msg in channel.sent if peer == "slow"] == ["a", "b"]


def test_outbox_reports_a_failed_send():
    channel = StuckChannel()
    failures: list[str] = []
    outbox = Outbox(channel)  # type: ignore[arg-type]
    channel.release.clear()
    outbox.post("slow", m.Abort("x"), on_fail=lambda exc: failures.append(str(exc)))
    outbox.close(15)
    assert failures == ["slow did not accept a message in time"]
