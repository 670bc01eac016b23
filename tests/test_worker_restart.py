# SPDX-License-Identifier: Apache-2.0
"""A worker that dies is started again (bounded, with back-off): its requests fail with the
reason, the server's /health shows the gap, the others learn its new endpoint and regions,
and the cluster serves again with the tokens of ``generate()``; past ``max_worker_restarts``
it stays down."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from fastapi.testclient import TestClient
from model_utils import make_image, reference_tokens

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request
from epdrt.runtime.sampling import SamplingParams
from epdrt.serve.app import ServeSettings, build_app

TIMEOUT_S = 60.0


def wait_until(check, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("victim", ["e0", "p0", "d0"])
def test_a_dead_worker_comes_back_and_the_cluster_serves_again(tiny_model_dir, victim):
    model = tiny_model_dir("llava")
    adapter = load_adapter(model)
    ph = adapter.spec.image_placeholder
    config = EPDConfig(mode="epd", max_worker_restarts=1, restart_backoff_s=0.2,
                       request_timeout_s=TIMEOUT_S)  # fmt: skip
    after = [Request(f"{ph} after {i}", [make_image(40, 30, 60 + i)], 6) for i in range(3)]
    expected = [
        reference_tokens(adapter, [adapter.prepare(r.prompt, r.images)], 6)[0] for r in after
    ]
    with EPDCluster.launch(model, config) as cluster:
        old_pid = cluster.worker_pids()[victim]
        started = threading.Event()
        longest = cluster.pre.spec.max_context - 40  # the prompt takes < 40 tokens
        request = Request(f"{ph} long", [make_image(40, 30, 1)], longest,
                          sampling=SamplingParams(ignore_eos=True))  # fmt: skip
        long = cluster.submit(request, on_token=lambda *_: started.set())
        assert started.wait(TIMEOUT_S)  # encoded, prefilled, decoding
        os.kill(old_pid, signal.SIGKILL)
        result = long.result(timeout=TIMEOUT_S)
        assert result.error is not None and f"worker {victim}" in result.error, result.error
        health = TestClient(build_app(cluster, ServeSettings(served_model_name="m")))
        gap = health.get("/health")  # it takes seconds to start again
        assert gap.status_code == 503 and gap.json()["dead_workers"] == [victim]
        wait_until(lambda: cluster.load()["workers"][victim]["alive"], f"{victim} is back")
        wait_until(lambda: health.get("/health").status_code == 200, "every worker is up")
        workers = cluster.load()["workers"]
        assert workers[victim]["restarts"] == 1
        others = {n: w["restarts"] for n, w in workers.items() if n != victim}
        assert set(others.values()) == {0}, f"another worker died with {victim}: {others}"
        assert cluster.worker_pids()[victim] != old_pid
        results = cluster.generate(after)
        for r, want in zip(results, expected):
            assert r.error is None, r.error
            assert r.token_ids == want
        # A second death is one too many: it stays down and says so.
        os.kill(cluster.worker_pids()[victim], signal.SIGKILL)
        wait_until(lambda: not cluster.load()["workers"][victim]["alive"], f"{victim} died")
        time.sleep(1.0)  # no restart is coming
        assert not cluster.load()["workers"][victim]["alive"]
        late = cluster.generate([Request("text only", [], 2)])[0]
        if victim != "e0":  # a text request needs no encoder
            assert late.error is not None and late.error_kind == "unavailable", late.error
    stats = cluster.worker_stats()
    in_use = [v for name, s in stats.items() for k, v in s.items() if k == "kv_blocks_in_use"]
    assert in_use and set(in_use) == {0.0}
