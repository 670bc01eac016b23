# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench kernels`` on a tiny CPU grid: records in the shared format, a table, a plot."""

import argparse
import json

from epdrt.bench import BENCHMARKS
from epdrt.bench import kernels as bench


def test_tiny_cpu_run_writes_records_and_plot(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--blocks", "1,3", "--block-sizes", "2", "--kv-heads", "2",
         "--head-dim", "8", "--hidden", "16", "--reps", "3", "--plot", str(tmp_path / "k.png")]
    )  # fmt: skip
    records = bench.run(args)
    assert BENCHMARKS["kernels"] is bench
    assert len(records) == len(bench.KERNELS) * 2 * len(bench.PEERS)
    for r in records:
        row = json.loads(r.to_json())
        for key in ("bench", "case", "metric", "value", "baseline", "baseline_value", "ratio",
                    "device", "date", "commit"):  # fmt: skip
            assert key in row
        assert row["bench"] == "kernels" and row["device"] == "cpu"
        assert abs(r.ratio - r.value / r.baseline_value) < 1e-9 * max(1.0, r.ratio)
        assert r.extra["impl"] in ("torch-ref", "host")
    assert (tmp_path / "k.png").stat().st_size > 0
    assert "%copy_" in capsys.readouterr().err
