# SPDX-License-Identifier: Apache-2.0
"""Search and goodput: a known optimum on a synthetic profile, goodput bisection against a
closed form, image-light workloads served without an encode pool, memory forcing EPD, and
the CLI."""

import json

import pytest

from epdrt.cli import main
from epdrt.planner import (
    SLO,
    DeployConfig,
    IntDist,
    Request,
    SearchSpace,
    Workload,
    WorkloadSpec,
    goodput,
    poisson_workload,
    search,
)
from epdrt.planner.synthetic import GB, linear_profile

SMALL = SearchSpace(
    encode_batch=(8,), prefill_tokens=(4096,), decode_batch=(64,), image_split=(1,),
    combos_per_mode=1,
)  # fmt: skip


def test_goodput_bisection_matches_the_closed_form():
    # D/D/1: n evenly spaced requests, 0.1 s each. Above 10 req/s request i waits
    # i * (0.1 - 1/rate); 90 of 100 meet TTFT <= 0.3 s while 0.2 / (0.1 - 1/rate) >= 89.
    p = linear_profile(prefill_fixed_s=0.1)
    w = Workload([Request(f"r{i}", float(i), (), 16, 1) for i in range(100)])
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    got = goodput(p, cfg, w, SLO(ttft_s=0.3, tpot_s=1.0, target=0.9), rel_tol=1e-3)
    assert got == pytest.approx(1 / (0.1 - 0.2 / 89), rel=2e-3)


def test_search_finds_the_known_optimum():
    # Per request: encode 0.35 s, prefill 0.15 s, decode negligible. At 10 req/s the fewest
    # GPUs keeping every pool under 100% load are E4 (87.5%) P2 (75%) D1; E3 or P1 overload.
    p = linear_profile(encode_per_image_s=0.35, prefill_fixed_s=0.15, decode_fixed_s=0.001)
    spec = WorkloadSpec(IntDist.constant(1), IntDist.constant(64), IntDist.constant(16),
                        IntDist.constant(5))  # fmt: skip
    w = poisson_workload(spec, 1500, seed=0)
    slo = SLO(ttft_s=3.0, tpot_s=0.5)
    space = SearchSpace(
        modes=("epd",), encode_batch=(1, 4), prefill_tokens=(80,), decode_batch=(8,),
        image_split=(1,), combos_per_mode=2,
    )  # fmt: skip
    plan = search(p, w, slo, max_gpus=16, rate=10.0, space=space)
    best = plan.ranked[0]
    assert best.config.pools == (4, 2, 1)
    assert best.attainment >= 0.9
    assert plan.best_by_mode["epd"] is best
    assert plan.recommendation.startswith("best: epd with a separate encode pool")
    assert plan.elapsed_s < 20


def test_image_light_workload_is_served_without_an_encode_pool():
    p = linear_profile(
        encode_fixed_s=0.01, encode_per_token_s=1e-5, prefill_fixed_s=0.01,
        prefill_per_token_s=5e-5, decode_fixed_s=0.01, decode_per_seq_s=1e-4,
    )  # fmt: skip
    spec = WorkloadSpec(IntDist.constant(0), IntDist.constant(0), IntDist.uniform(50, 400),
                        IntDist.uniform(10, 100))  # fmt: skip
    w = poisson_workload(spec, 800, seed=1)
    plan = search(p, w, SLO(1.0, 0.05), max_gpus=8, rate=20.0, space=SMALL)
    best = plan.ranked[0]
    assert best.config.mode in ("pd", "aggregated")
    assert "without" in plan.recommendation and "encode pool" in plan.recommendation
    epd = plan.best_by_mode["epd"]
    assert epd is not None and epd.config.num_gpus > best.config.num_gpus


def test_memory_forces_a_separate_encode_pool():
    # A 5 GB encoder beside 14 GB of LM weights on 20 GB GPUs leaves KV for 1000 tokens;
    # a request's prefill needs 1100 (decode 1600), so only epd, where no LM GPU holds the
    # encoder, can serve them.
    p = linear_profile(
        encode_per_image_s=0.01, prefill_fixed_s=0.02, decode_fixed_s=0.005,
        device_bytes=20 * GB, lm_weight_bytes=14 * GB, encode_weight_bytes=5 * GB,
        kv_bytes_per_token=1e6,
    )  # fmt: skip
    spec = WorkloadSpec(IntDist.constant(1), IntDist.constant(500), IntDist.constant(600),
                        IntDist.constant(500))  # fmt: skip
    w = poisson_workload(spec, 400, seed=2)
    plan = search(p, w, SLO(1.0, 0.05), max_gpus=8, rate=2.0, space=SMALL)
    assert plan.ranked[0].config.mode == "epd"
    assert all(e.config.mode == "epd" for e in plan.ranked)
    assert plan.best_by_mode["pd"] is None and plan.best_by_mode["aggregated"] is None
    assert any("memory" in n for n in plan.notes)


def test_goodput_objective_without_a_rate():
    p = linear_profile(prefill_fixed_s=0.01, prefill_per_token_s=1e-4, decode_fixed_s=0.01)
    spec = WorkloadSpec(IntDist.constant(0), IntDist.constant(0), IntDist.constant(100),
                        IntDist.constant(20))  # fmt: skip
    w = poisson_workload(spec, 600, seed=3)
    space = SearchSpace(modes=("pd", "aggregated"), encode_batch=(8,), prefill_tokens=(1024,),
                        decode_batch=(64,), combos_per_mode=2)  # fmt: skip
    plan = search(p, w, SLO(0.5, 0.05), max_gpus=4, space=space)
    assert plan.objective == "goodput-per-gpu"
    gpg = [e.goodput_per_gpu for e in plan.ranked]
    assert all(g is not None and g > 0 for g in gpg)
    assert gpg == sorted(gpg, reverse=True)


def test_cli_plan_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    assert "--slo-ttft" in capsys.readouterr().out


def test_cli_plan_json_and_png(tmp_path, capsys):
    prof = tmp_path / "p.json"
    linear_profile(
        encode_fixed_s=0.005, encode_per_token_s=2e-5, prefill_fixed_s=0.005,
        prefill_per_token_s=4e-5, decode_fixed_s=0.008, decode_per_seq_s=5e-5,
    ).save(prof)  # fmt: skip
    out = tmp_path / "plan.json"
    rc = main([
        "plan", "--profile", str(prof), "--rate", "5", "--slo-ttft", "1", "--slo-tpot", "0.05",
        "--gpus", "6", "--requests", "300", "--images", "0-2", "--image-tokens", "256",
        "--prompt-tokens", "50", "--output-tokens", "10-40", "--modes", "epd,pd,aggregated",
        "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "best per mode" in text and "goodput/GPU" in text
    d = json.loads(out.read_text())
    assert d["objective"] == "min-gpus" and d["rate"] == 5.0
    assert d["ranked"] and d["ranked"][0]["slo_attainment"] >= 0.9
    assert set(d["best_by_mode"]) == {"epd", "pd", "aggregated"}
    assert d["profile"]["source"] == "synthetic"
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert d["curves"]


def test_cli_plan_reports_missing_arguments(capsys):
    assert main(["plan", "--profile", "x"]) == 2
    assert "--slo-ttft" in capsys.readouterr().err


def test_cli_plan_says_when_no_encode_pool_is_needed(tmp_path, capsys):
    # 90% of requests without images, one small image otherwise: colocating encode wins.
    prof = tmp_path / "p.json"
    linear_profile(
        encode_fixed_s=0.01, encode_per_token_s=1e-5, prefill_fixed_s=0.01,
        prefill_per_token_s=5e-5, decode_fixed_s=0.01, decode_per_seq_s=1e-4,
    ).save(prof)  # fmt: skip
    out = tmp_path / "plan.json"
    rc = main([
        "plan", "--profile", str(prof), "--rate", "20", "--slo-ttft", "1", "--slo-tpot", "0.05",
        "--gpus", "8", "--requests", "400", "--images", "0:0.9,1:0.1", "--image-tokens", "64",
        "--prompt-tokens", "50-400", "--output-tokens", "10-100", "--no-png", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    verdict = next(line for line in text.splitlines() if line.startswith("best:"))
    assert "without" in verdict and "encode pool" in verdict
    d = json.loads(out.read_text())
    assert d["ranked"][0]["config"]["mode"] in ("pd", "aggregated")
    assert d["recommendation"] == verdict
    epd = d["best_by_mode"]["epd"]
    assert epd is not None and epd["config"]["num_gpus"] > d["ranked"][0]["config"]["num_gpus"]
    assert "png" not in d


@pytest.mark.slow
def test_a_64_gpu_budget_is_searched_in_seconds():
    from epdrt.planner import load_profile

    p = load_profile("qwen2-vl-7b-h100-estimated")
    spec = WorkloadSpec(IntDist.uniform(2, 6), IntDist.constant(1024), IntDist.uniform(32, 256),
                        IntDist.uniform(32, 512))  # fmt: skip
    plan = search(p, poisson_workload(spec, 1000, seed=0), SLO(1.5, 0.04), max_gpus=64, rate=150)
    best = plan.ranked[0]
    assert best.attainment >= 0.9 and 30 <= best.config.num_gpus <= 64
    assert set(plan.best_by_mode) == {"epd", "pd", "ed", "aggregated"}
    assert plan.elapsed_s < 25, plan.elapsed_s  # about 8 s on this project's 2-core CPU host
