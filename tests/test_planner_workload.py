# SPDX-License-Identifier: Apache-2.0
"""Workloads: distributions, seeded Poisson arrivals, rate rescaling, JSONL traces."""

import json

import numpy as np
import pytest

from epdrt import InvalidArgument
from epdrt.planner import IntDist, Request, WorkloadSpec, load_trace, poisson_workload, save_trace

SPEC = WorkloadSpec(
    IntDist.parse("0:0.5,2:0.5"),
    IntDist.parse("576"),
    IntDist.parse("10-20"),
    IntDist.parse("1-8"),
)


@pytest.mark.parametrize(
    ("text", "mean", "top"),
    [("4", 4.0, 4), ("2-8", 5.0, 8), ("0:0.6,1:0.3,4:0.1", 0.7, 4)],
)
def test_intdist_parse(text, mean, top):
    d = IntDist.parse(text)
    assert d.mean == pytest.approx(mean)
    assert d.max == top
    s = d.sample(np.random.default_rng(0), 20000)
    assert s.min() >= 0 and s.max() <= top
    assert s.mean() == pytest.approx(mean, rel=0.05)


@pytest.mark.parametrize("bad", ["x", "5-2", "1:0.5,2", "1:-1"])
def test_intdist_rejects_bad_text(bad):
    with pytest.raises(InvalidArgument):
        IntDist.parse(bad)


def test_poisson_workload_is_seeded_and_rescales():
    a = poisson_workload(SPEC, 2000, seed=7)
    b = poisson_workload(SPEC, 2000, seed=7)
    assert a.requests == b.requests
    assert a.requests != poisson_workload(SPEC, 2000, seed=8).requests
    at5 = a.at_rate(5.0)
    assert at5[0].arrival_s == 0.0
    assert (len(at5) - 1) / at5[-1].arrival_s == pytest.approx(5.0, rel=0.05)
    # Same shapes, times scaled by the rate ratio.
    at10 = a.at_rate(10.0)
    assert [r.image_tokens for r in at5] == [r.image_tokens for r in at10]
    assert at10[-1].arrival_s == pytest.approx(at5[-1].arrival_s / 2)
    means = a.means()
    assert means["num_images"] == pytest.approx(1.0, rel=0.1)
    assert all(r.input_tokens == r.prompt_tokens + 576 * r.num_images for r in a.requests)
    assert all(r.output_tokens >= 1 for r in a.requests)


def test_trace_round_trip_and_forms(tmp_path):
    reqs = [Request("a", 0.0, (576, 576), 12, 30), Request("b", 0.5, (), 7, 1),
            Request("c", 0.75, (100, 300), 5, 2)]  # fmt: skip
    path = tmp_path / "t.jsonl"
    save_trace(reqs, path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["image_tokens"] == 576 and lines[0]["num_images"] == 2
    assert lines[2]["image_tokens"] == [100, 300]
    w = load_trace(path)
    assert w.requests == reqs
    assert w.base_rate == pytest.approx(2 / 0.75)
    assert w.at_rate(2 / 0.75)[2].arrival_s == pytest.approx(0.75)


def test_trace_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1}\n{"arrival_s": 1}\n')
    with pytest.raises(InvalidArgument, match="line 2"):
        load_trace(path)
    path.write_text(
        '{"arrival_s": 0, "num_images": 2, "image_tokens": [1], "prompt_tokens": 1, '
        '"output_tokens": 1}\n'
    )
    with pytest.raises(InvalidArgument, match="line 1"):
        load_trace(path)
