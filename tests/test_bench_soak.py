# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench soak`` with fewer requests: over HTTP, with corrupt images, clients that
disconnect and the decode worker killed halfway, every request is answered or fails with a
clear error, the worker comes back, no block stays in use and nothing is left in /dev/shm."""

import argparse

import pytest

from epdrt.bench import BENCHMARKS
from epdrt.bench import soak as bench


@pytest.mark.slow
def test_a_short_soak_leaves_nothing_behind(tiny_model_dir):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", tiny_model_dir("llava"), "--num-requests", "160",
                              "--rate", "40", "--bad-images", "0.15", "--disconnects", "0.1",
                              "--warmup", "16", "--max-tokens", "6"])  # fmt: skip
    answered, in_use, rss, fds = bench.run(args)
    assert BENCHMARKS["soak"] is bench
    extra = answered.extra
    assert answered.value == 1.0, extra["unexpected"]
    outcomes = extra["outcomes"]
    assert outcomes.get("bad/rejected", 0) > 0 and outcomes.get("disconnect/disconnected", 0) > 0
    assert outcomes.get("good/ok", 0) > 100
    assert extra["killed"] == ["d0"] and extra["restarts"]["d0"] == 1
    assert in_use.value == 0.0 and extra["shm_left"] == []
    assert fds.value <= 1.1 * fds.baseline_value, (fds.value, fds.baseline_value)
    assert rss.value > 0 and rss.baseline_value > 0
