# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench decode`` on a tiny model: both metrics per point, ratios from the two runs."""

import argparse

from epdrt.bench import BENCHMARKS
from epdrt.bench import decode as bench


def test_tiny_run_measures_epdrt_and_generate(tiny_model_dir, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--model", tiny_model_dir("qwen2-vl"), "--device", "cpu", "--batches", "1,3",
         "--contexts", "20", "--steps", "3", "--prefill-chunk", "8", "--block-size", "4"]
    )  # fmt: skip
    records = bench.run(args)
    assert BENCHMARKS["decode"] is bench
    assert [(r.case, r.metric) for r in records] == [
        (case, metric)
        for case in ("b1-ctx20", "b3-ctx20")
        for metric in ("tpot_ms", "prefill_tokens_per_s")
    ]
    for r in records:
        assert r.bench == "decode" and r.baseline == "generate()"
        assert r.value > 0 and r.baseline_value > 0
        if r.metric == "tpot_ms":  # lower is better: the ratio is generate / epdrt
            assert abs(r.ratio - r.baseline_value / r.value) < 1e-9 * r.ratio
        assert r.extra["steps"] == 3 and r.extra["backend"] == "auto"
    assert "TPOT" in capsys.readouterr().err
