# SPDX-License-Identifier: Apache-2.0
"""Bad input and dying workers: the request fails with a clear reason, the rest go on, and
nothing is left behind (processes, their memory regions)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq
from leaks import holders, region_inodes
from model_utils import make_image, png_bytes, reference_tokens

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request
from epdrt.runtime import messages as m


def _gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_bad_requests_fail_alone(tiny_model_dir, tmp_path):
    ph = "<image>"
    good = png_bytes(make_image(40, 30, 1))
    config = EPDConfig(
        mode="epd", max_images_per_request=2, max_image_bytes=500_000, mm_cache_tokens=16
    )
    bad = {
        "not a readable image": Request(f"{ph}", [b"garbage, not an image"], 4),
        "corrupt": Request(f"{ph}", [good[: len(good) // 2]], 4),
        "not accepted": Request(f"{ph}", [png_bytes(make_image(40, 30, 2), fmt="TIFF")], 4),
        "bytes, more than the limit": Request(f"{ph}", [bytes(600_000)], 4),
        "more than the limit of 2": Request(f"{ph}{ph}{ph}", [good] * 3, 4),
        "placeholders": Request(f"{ph} {ph}", [good], 4),
        "context": Request(f"{ph} " + "word " * 600, [good], 4),
        "whole MM-token cache": Request(f"{ph}{ph}", [good, png_bytes(make_image(40, 30, 3))], 4),
        "could not read": Request(f"{ph}", [str(tmp_path / "missing.png")], 4),
    }
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        results = cluster.generate([*bad.values(), Request(f"fine {ph}", [good], 4)])
    for (expected, _), r in zip(bad.items(), results):
        assert r.error is not None and expected in r.error, (expected, r.error)
        assert r.token_ids == []
    assert results[-1].error is None and len(results[-1].token_ids) == 4


def test_killed_worker_fails_its_requests(tiny_model_dir):
    own = region_inodes()
    config = EPDConfig(mode="epd", num_decode=2, request_timeout_s=60)
    ph = "<image>"
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        pids = list(cluster.worker_pids().values())
        regions = set().union(*(region_inodes(pid) for pid in pids))
        assert len(regions) >= 4  # e0's MM cache, p0's MM and KV caches, d0's and d1's KV
        warm = cluster.generate([Request(f"{ph} warm", [make_image(40, 30, 9)], 2)])[0]
        assert warm.error is None
        longest = cluster.pre.spec.max_context - 40  # the prompts take < 40 tokens
        futures = [
            cluster.submit(Request(f"{ph} long {i}", [make_image(40, 30, i)], longest))
            for i in range(6)
        ]
        time.sleep(0.5)  # decoding is under way on both decoders
        os.kill(cluster.worker_pids()["d0"], signal.SIGKILL)
        start = time.monotonic()
        results = [f.result(timeout=60) for f in futures]
        assert time.monotonic() - start < 60
        failed = [r for r in results if r.error is not None]
        assert failed, "requests decoding on the killed worker must fail"
        for r in failed:
            assert "worker d0 (decode) died" in r.error
        # The survivors go on serving, on the remaining decoder.
        after = cluster.generate([Request(f"{ph} after", [make_image(40, 30, 20)], 3)])[0]
        assert after.error is None and len(after.token_ids) == 3
    assert _gone(pids)
    assert holders(regions) == set()  # no process keeps a worker's cache memory
    assert region_inodes() == own


def test_ctrl_c_shuts_down_cleanly(tiny_model_dir, tmp_path):
    pid_file = tmp_path / "pids"
    # A runner started in the background (no job control) passes SIGINT on as ignored, and
    # Python then installs no KeyboardInterrupt handler: the script restores it first.
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from epdrt.runtime import EPDCluster, EPDConfig
        with EPDCluster.launch({tiny_model_dir("llava")!r}, EPDConfig(mode="epd")) as c:
            open({str(pid_file)!r}, "w").write(" ".join(map(str, c.worker_pids().values())))
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, "the cluster script exited early"
            time.sleep(0.2)
        pids = [int(p) for p in Path(pid_file).read_text().split()]
        regions = set().union(*(region_inodes(pid) for pid in pids))
        assert regions
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(pids)
    assert holders(regions) == set()


@pytest.mark.parametrize("victim", ["e0", "p0"])
def test_killed_stage_reports_reason(tiny_model_dir, victim):
    config = EPDConfig(mode="epd", request_timeout_s=60, max_worker_restarts=0)
    ph = "<image>"
    with EPDCluster.launch(tiny_model_dir("llava"), config) as cluster:
        pids = list(cluster.worker_pids().values())
        os.kill(cluster.worker_pids()[victim], signal.SIGKILL)
        time.sleep(0.5)
        r = cluster.generate([Request(f"{ph} x", [make_image(40, 30, 1)], 3)])[0]
        assert r.error is not None
        assert victim in r.error or "no live" in r.error
    assert _gone(pids)


# Loaded by every worker process (PYTHONPATH): model calls that raise on demand. An encode
# raises while its batch holds a key listed in the file "encode"; an embed (prefill, before
# the LM runs) or a decode step (a forward of one token per sequence) raises once when the
# file named after it exists.
FAULT_HOOK = """
import os
from epdrt.runtime.stage_model import StageModel

DIR = os.path.dirname(os.path.abspath(__file__))


def _fires(stage):
    path = os.path.join(DIR, stage)
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def _wrap(name, should_fail, label=None):
    original = getattr(StageModel, name)

    def call(self, *args):
        if should_fail(*args):
            raise RuntimeError(f"injected {label or name} fault")
        return original(self, *args)

    setattr(StageModel, name, call)


def _bad_keys():
    try:
        with open(os.path.join(DIR, "encode")) as f:
            return {bytes.fromhex(line) for line in f.read().split()}
    except FileNotFoundError:
        return set()


_wrap("encode", lambda items: bool(_bad_keys() & {key for key, _, _ in items}))
_wrap("embed", lambda ids: _fires("embed"))
_wrap("forward", lambda embeds, batch, extras: batch.is_decode and _fires("decode"), "decode")
"""


def test_a_bad_step_fails_its_requests_and_the_workers_serve_on(tiny_model_dir, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """A failing encode (one image of a batch), prefill and decode step, a message that does
    not decode and one no role takes: the requests in the step fail naming the stage and the
    exception, no worker exits, and later requests get generate()'s tokens."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    model = tiny_model_dir("llava")
    adapter = load_adapter(model)
    ph = adapter.spec.image_placeholder

    def request(i: int) -> Request:
        return Request(f"{ph} picture {i}", [make_image(40, 30, 300 + i)], 4)

    def expected(r: Request) -> list[int]:
        return reference_tokens(adapter, [adapter.prepare(r.prompt, r.images)], 4)[0]

    bad_image = request(0).images[0]
    (hook / "encode").write_text(adapter.preprocess_image(bad_image).content_key.hex())
    config = EPDConfig(mode="epd", request_timeout_s=60)
    with EPDCluster.launch(model, config) as cluster:
        pids = cluster.worker_pids()
        batch = [request(0), request(1), request(2)]  # one bad image among good ones
        results = cluster.generate(batch)
        assert "e0: encode step failed: RuntimeError: injected encode fault" in results[0].error
        assert [r.token_ids for r in results[1:]] == [expected(r) for r in batch[1:]]
        for stage, worker in (("embed", "p0: prefill"), ("decode", "d0: decode")):
            (hook / stage).touch()
            failed = cluster.generate([request(3)])[0]
            assert failed.error == f"{worker} step failed: RuntimeError: injected {stage} fault"
        push = zmq.Context.instance().socket(zmq.PUSH)  # a stranger on p0's endpoint
        push.setsockopt(zmq.LINGER, 1000)
        try:
            push.connect(f"ipc://{cluster._run_dir}/p0.sock")
            push.send_multipart([b"\xc1 not msgpack"])
            push.send_multipart(m.CODEC.encode(m.Stats(worker="x", counters={})))
        finally:
            push.close()
        later = [request(i) for i in (4, 5)]
        results = cluster.generate(later)
        assert [r.token_ids for r in results] == [expected(r) for r in later]
        assert cluster.worker_pids() == pids
        for pid in pids.values():
            os.kill(pid, 0)  # alive (raises ProcessLookupError if not)
    stats = cluster.worker_stats()
    assert stats["p0"]["messages_dropped"] == 2
