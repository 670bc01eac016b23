# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench planner``: simulated against real runs of the tiny LLaVA, as benchmark
records (one per configuration and metric, predicted beside measured, ratio = min / max)."""

import json

import pytest

from epdrt.bench._speed_probe import SpeedProbe
from epdrt.bench.planner import RouterPhase, median_records, router_costs
from epdrt.benchmarking import Record
from epdrt.cli import main
from epdrt.planner.model_runner import profile_model
from epdrt.planner.profile import TransferProfile, load_profile


@pytest.mark.slow
def test_bench_planner_writes_predicted_and_measured_records(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llava")
    # A quick profile (no transfer benchmark, no overheads) keeps the test short.
    prof = tmp_path / "tiny.json"
    profile_model(model, quick=True, overheads=False, transfer=TransferProfile(1e-4, 5e9)).save(
        prof
    )
    out, used = tmp_path / "planner.jsonl", tmp_path / "used.json"
    rc = main([
        "bench", "planner", "--model", model, "--profile", str(prof), "--save-profile", str(used),
        "--deployments", "aggregated:0:1:0", "--requests", "12", "--rates", "20", "--warmup", "1",
        "--warmup-burst", "3", "--calibration-requests", "4", "--no-host-probes",
        "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "aggregated@20" in err and "cpu w0" in err and "cpu router" in err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    metrics = {r["metric"] for r in recs}
    assert {"ttft_p90_s", "throughput_rps", "ttft_p50_s", "tpot_p90_s"} <= metrics
    for r in recs:
        assert r["bench"] == "planner" and r["case"].startswith("aggregated N1")
        p, m = r["value"], r["baseline_value"]
        assert r["extra"]["predicted"] == p and r["extra"]["measured"] == m
        assert r["ratio"] == pytest.approx(min(p, m) / max(p, m))
        assert r["extra"]["requests"] == 12 and r["extra"]["rate"] == 20
        assert r["extra"]["host_speed_ratio"] == 1.0  # no probes
        assert r["extra"]["host_interference"] == 0.0
        assert r["extra"]["dtype"] == "float32"  # the CPU's default, for profile and runs
    thr = next(r for r in recs if r["metric"] == "throughput_rps")
    assert 0 < thr["baseline_value"] < 40 and thr["ratio"] > 0.5  # both near the offered rate
    # The calibration fills in what the quick profile lacked, and is saved with it.
    cal = recs[0]["extra"]["calibration"]
    assert cal["requests"] == 4 and cal["request_s"] >= 0 and cal["step_s"] >= 0
    assert cal["route_s"] >= 0 and cal["token_message_s"] >= 0
    one_at_a_time, all_at_once = cal["router_phases"]
    for phase in (one_at_a_time, all_at_once):  # a first token each, then the decode steps
        assert phase["requests"] == 4 and phase["tokens_messages"] >= 4 and phase["cpu_s"] > 0
    saved = load_profile(used).overheads
    assert (saved.request_s, saved.route_s) == (cal["request_s"], cal["route_s"])
    assert saved.token_message_s == cal["token_message_s"]
    # The CPU each process used while serving, beside the work the simulation charged to it.
    cpu = thr["extra"]["cpu_s"]
    assert set(cpu) == {"w0", "router"}
    assert (cpu["w0"]["sim"], cpu["router"]["sim"]) == ("N0", "router")
    assert cpu["w0"]["measured"] > 0 and cpu["w0"]["simulated"] > 0
    assert cpu["router"]["measured"] > 0


@pytest.mark.parametrize(
    ("route_s", "per_message_s", "want"),
    [
        (2e-3, 1e-4, (2e-3, 1e-4)),
        (2e-3, 0.0, (2e-3, 0.0)),
        (0.0, 3e-4, (0.0, 3e-4)),
        # Noise that implies a negative cost per message: that cost is 0, the rest per request.
        (2e-3, -1e-5, None),
    ],
)
def test_router_costs_separate_per_request_and_per_message_cpu(route_s, per_message_s, want):
    phases = [  # one at a time (ten steps a request), then all at once (batched steps)
        RouterPhase(32, 32 + 320, 0.0, 0.05),
        RouterPhase(32, 32 + 24, 0.0, 0.05),
    ]
    for p in phases:
        p.cpu_s = (
            p.prepare_s + p.requests * route_s + (p.tokens_messages - p.requests) * per_message_s
        )
    got = router_costs(phases)
    if want is None:
        assert got[1] == 0.0 and got[0] == pytest.approx(2e-3, rel=0.1)
    else:
        assert got == pytest.approx(want, abs=1e-12)


def test_median_records_compare_the_medians_over_repeats():
    def rec(repeat, predicted, measured, metric="ttft_p90_s"):
        extra = {"runtime_config": "pd P1 D1", "rate": 6.0, "config": {}, "repeat": repeat}
        return Record("planner", f"pd @ 6 req/s {metric} (repeat {repeat})", metric, predicted,
                      "measured (epdrt run)", measured, 0.0, extra=extra)  # fmt: skip

    recs = [rec(1, 0.09, 0.085), rec(2, 0.08, 0.1), rec(3, 0.115, 0.105), rec(1, 6, 5, "x")]
    med = {r.metric: r for r in median_records(recs)}
    r = med["ttft_p90_s"]
    assert (r.value, r.baseline_value) == (0.09, 0.1) and r.ratio == pytest.approx(0.9)
    assert r.case == "pd @ 6 req/s ttft_p90_s (median of 3 repeats)"
    assert r.extra["repeats_measured"] == [0.085, 0.1, 0.105]
    assert med["x"].extra["error"] == pytest.approx(0.2)


def test_speed_probe_times_the_models_batches_and_gives_ratios(tiny_model_dir):
    with SpeedProbe(tiny_model_dir("llava")) as probe:
        assert 0 < probe.reference < 5
        assert probe.ratio([2 * probe.reference, 4 * probe.reference]) == pytest.approx(3.0)
        assert 0.1 < probe.ratio([probe.seconds()]) < 10  # the same host moments apart
        # A second process running the same batches: about 0 on a core of its own, about 1
        # when both share one core.
        assert 0.0 <= probe.interference() < 5.0
    assert probe._proc.poll() is not None  # closed: the probe process is gone
