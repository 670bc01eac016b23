# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench transfer`` on a tiny sweep: two processes per transport, records in the shared
format (bandwidth and latency against the in-process copy), a table and a plot."""

import argparse
import json

import pytest

from epdrt.bench import BENCHMARKS
from epdrt.bench import transfer as bench

KEYS = ("bench", "case", "metric", "value", "baseline", "baseline_value", "ratio", "device",
        "date", "commit")  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_tiny_cpu_sweep_writes_records_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "transfer.png"
    args = parse("--device", "cpu", "--transports", "ipc,dist", "--payloads", "4K,64K",
                 "--reps", "3", "--latency-reps", "3", "--min-bytes", "64K",
                 "--plot", str(plot))  # fmt: skip
    records = bench.run(args)
    assert BENCHMARKS["transfer"] is bench
    cases = {(r.extra["transport"], r.extra["payload_bytes"], r.extra["block_bytes"], r.metric)
             for r in records}  # fmt: skip
    grid = ((4096, 4096), (65536, 16384))
    assert cases == {(t, p, b, m) for t in ("ipc", "dist") for p, b in grid for m in ("GB/s", "us")}
    for r in records:
        row = json.loads(r.to_json())
        assert all(key in row for key in KEYS)
        assert row["bench"] == "transfer" and row["device"] == "cpu"
        assert r.value > 0 and r.baseline_value > 0 and r.ratio > 0
        assert r.extra["verified"]
        assert r.extra["num_blocks"] * r.extra["block_bytes"] == r.extra["payload_bytes"]
        if r.metric == "GB/s":
            expected = r.value / r.baseline_value
            assert r.extra["payload_bytes"] / r.extra["seconds_per_transfer"] / 1e9 == (
                pytest.approx(r.value)
            )
        else:
            expected = r.baseline_value / r.value
            assert r.case.endswith(" latency")
            assert r.value == pytest.approx(r.extra["latency_seconds"] * 1e6)
        # nixlbench's columns: average and p99 latency, and the time to post a transfer.
        e = r.extra
        assert e["latency_p99_seconds"] >= e["latency_seconds"] > 0
        assert e["latency_avg_seconds"] > 0 and 0 < e["post_seconds"] < e["latency_p99_seconds"]
        assert r.ratio == pytest.approx(expected, rel=1e-9)
    # Both records of a case share one limit, and one payload has one limit.
    limits = {}
    for r in records:
        limits.setdefault(r.extra["payload_bytes"], set()).add(r.extra["copy_seconds"])
    assert all(len(v) == 1 for v in limits.values())
    assert plot.stat().st_size > 0
    err = capsys.readouterr().err
    assert "%copy" in err and "4KiB latency" in err


def test_sweeps_cover_the_issue_grid():
    full = bench.cases_from_args(parse("--full"))
    assert min(p for p, _ in full) == 4 << 10 and max(p for p, _ in full) == 256 << 20
    assert {b for _, b in full} == {4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20}
    assert all(b <= p for p, b in full)
    default = bench.cases_from_args(parse())
    assert (4 << 10, 4 << 10) in default  # the 4 KiB latency case
    assert sum(1 for p, b in default if p >= 1 << 20 and b == 16 << 10) >= 2
    capped = bench.cases_from_args(parse("--max-payload", "1M"))
    assert max(p for p, _ in capped) == 1 << 20
    assert bench.cases_from_args(parse("--payloads", "4K,1MiB", "--blocks", "4K,1M")) == [
        (4 << 10, 4 << 10), (1 << 20, 4 << 10), (1 << 20, 1 << 20),
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        parse("--payloads", "lots")
