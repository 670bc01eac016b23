# SPDX-License-Identifier: Apache-2.0
"""Simulator against cases with known answers: a deterministic single server, an M/D/1
queue's mean wait, pipelines whose every time is a sum of known latencies, KV back-pressure
and memory accounting."""

import numpy as np
import pytest

from epdrt import InvalidArgument
from epdrt.planner import (
    SLO,
    DeployConfig,
    IntDist,
    Request,
    WorkloadSpec,
    memory_plan,
    poisson_workload,
    predict,
    simulate,
)
from epdrt.planner.config import check_memory
from epdrt.planner.synthetic import GB, linear_profile


def _text(i: int, t: float, prompt: int = 16, out: int = 1) -> Request:
    return Request(f"r{i}", t, (), prompt, out)


def test_deterministic_single_server_completion_times():
    # One GPU, one request per prefill batch (budget = prompt), 0.2 s each, FIFO.
    p = linear_profile(prefill_fixed_s=0.2)
    arrivals = [0.0, 0.1, 0.15, 1.0, 1.05]
    reqs = [_text(i, t) for i, t in enumerate(arrivals)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), reqs)
    finish = [0.2, 0.4, 0.6, 1.2, 1.4]
    np.testing.assert_allclose(res.ttft_s, np.subtract(finish, arrivals), atol=1e-12)
    assert res.completed == 5
    assert res.duration_s == pytest.approx(1.4)
    assert res.throughput_rps == pytest.approx(5 / 1.4)
    assert res.utilization["prefill"] == pytest.approx(1.0 / 1.4)


def test_prefill_batches_whatever_is_queued_up_to_the_token_budget():
    p = linear_profile(prefill_fixed_s=0.2)
    reqs = [_text(0, 0.0), _text(1, 0.05), _text(2, 0.1), _text(3, 0.15)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=32), reqs)
    # Batch {0} at 0; {1, 2} at 0.2 (3 would exceed 32 tokens); {3} at 0.4.
    np.testing.assert_allclose(res.ttft_s, [0.2, 0.35, 0.3, 0.45], atol=1e-12)


@pytest.mark.parametrize("rho", [0.3, 0.5])
def test_md1_mean_wait(rho):
    # Poisson arrivals, deterministic 1 s service: mean wait rho / (2 mu (1 - rho)).
    p = linear_profile(prefill_fixed_s=1.0)
    spec = WorkloadSpec(IntDist.constant(0), IntDist.constant(0), IntDist.constant(16),
                        IntDist.constant(1))  # fmt: skip
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    waits = []
    for seed in (1, 2):
        res = simulate(p, cfg, poisson_workload(spec, 20000, seed).at_rate(rho))
        waits.append(float(np.mean(res.ttft_s)) - 1.0)
    assert np.mean(waits) == pytest.approx(rho / (2 * (1 - rho)), rel=0.04)


def test_epd_pipeline_times_are_sums_of_known_latencies():
    # 2 images of 100 tokens split over 2 encoders; MM and KV transfers; 5 decode steps.
    p = linear_profile(
        encode_fixed_s=0.05,
        encode_per_image_s=0.01,
        prefill_fixed_s=0.1,
        prefill_per_token_s=1e-4,
        decode_fixed_s=0.02,
        transfer_latency_s=0.001,
        transfer_bytes_per_s=1e9,
        mm_bytes_per_token=1000,
        kv_bytes_per_token=2000,
    )
    req = Request("a", 0.0, (100, 100), 50, 6)
    cfg = DeployConfig("epd", 2, 1, 1, image_split=2)
    res = simulate(p, cfg, [req])
    encode = 0.05 + 0.01  # one image per encoder, in parallel
    mm = 0.001 + 100 * 1000 / 1e9
    prefill = 0.1 + 250 * 1e-4
    kv = 0.001 + 250 * 2000 / 1e9
    assert res.ttft_s[0] == pytest.approx(encode + mm + prefill, abs=1e-12)
    assert res.tpot_s[0] == pytest.approx((kv + 5 * 0.02) / 5, abs=1e-12)
    # Split 1: both images in one batch on one encoder, one larger MM transfer.
    res1 = simulate(p, DeployConfig("epd", 2, 1, 1, image_split=1), [req])
    mm1 = 0.001 + 200 * 1000 / 1e9
    assert res1.ttft_s[0] == pytest.approx(0.05 + 2 * 0.01 + mm1 + prefill, abs=1e-12)
    # pd: encode on the prefill GPU, no MM transfer.
    resp = simulate(p, DeployConfig("pd", 1, 1, 1), [req])
    assert resp.ttft_s[0] == pytest.approx(0.05 + 2 * 0.01 + prefill, abs=1e-12)


def test_decode_steps_and_continuous_batching():
    # Step time 0.01 + 0.001 per sequence.
    p = linear_profile(decode_fixed_s=0.01, decode_per_seq_s=0.001)
    a = _text(0, 0.0, out=11)
    b = _text(1, 0.015, out=3)
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1), [a, b])
    # a alone: steps end at 0.011, 0.022; b's (instant) prefill waits for the step boundary
    # at 0.022, then b decodes 2 steps of 0.012 beside a.
    assert res.ttft_s[1] == pytest.approx(0.022 - 0.015, abs=1e-12)
    assert res.tpot_s[1] == pytest.approx(0.012, abs=1e-12)
    # a: 2 solo steps, 2 shared, 6 solo again.
    assert res.tpot_s[0] == pytest.approx((2 * 0.011 + 2 * 0.012 + 6 * 0.011) / 10, abs=1e-12)


def test_prefill_preempts_decode_at_step_boundaries_in_aggregated_mode():
    p = linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01)
    a = _text(0, 0.0, out=21)  # decodes 0.1 .. 0.3 when alone
    b = _text(1, 0.105, out=1)
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), [a, b])
    # b's prefill starts at the step boundary 0.11 and delays a's remaining steps by 0.1.
    assert res.ttft_s[1] == pytest.approx(0.11 + 0.1 - 0.105, abs=1e-12)
    assert res.tpot_s[0] == pytest.approx((20 * 0.01 + 0.1) / 20, abs=1e-12)
    # Disaggregated, the same pair does not interfere.
    res_pd = simulate(p, DeployConfig("pd", 1, 1, 1, prefill_tokens=16), [a, b])
    assert res_pd.tpot_s[0] == pytest.approx(0.01, abs=1e-12)


def test_kv_capacity_back_pressure_completes_everything_in_waves():
    # KV for 300 tokens per GPU; each request needs 100 + 50: two at a time.
    p = linear_profile(
        decode_fixed_s=0.01,
        device_bytes=1000 + 300,
        lm_weight_bytes=1000,
        encode_weight_bytes=0,
        kv_bytes_per_token=1,
    )
    reqs = [_text(i, 0.0, prompt=100, out=50) for i in range(6)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=100), reqs)
    assert res.completed == 6
    finish = res.ttft_s + res.tpot_s * 49
    waves = np.unique(np.round(finish, 9))
    assert len(waves) == 3  # three waves of two


def test_colocated_stages_shrink_kv_capacity():
    p = linear_profile(
        device_bytes=80 * GB,
        lm_weight_bytes=14 * GB,
        encode_weight_bytes=6 * GB,
        kv_bytes_per_token=1e6,
        encode_activation_bytes_per_token=1e3,
        prefill_activation_bytes_per_token=1e5,
    )
    kw = {"encode_batch": 8, "prefill_tokens": 4096}
    epd = memory_plan(p, DeployConfig("epd", 1, 1, 1, **kw), max_image_tokens=1000)
    pd = memory_plan(p, DeployConfig("pd", 1, 1, 1, **kw), max_image_tokens=1000)
    ed = memory_plan(p, DeployConfig("ed", 1, 1, 1, **kw), max_image_tokens=1000)
    agg = memory_plan(p, DeployConfig("aggregated", 1, 1, 1, **kw), max_image_tokens=1000)
    prefill_act = 4096 * 1e5
    assert epd["P"].kv_tokens == int((80 * GB - 14 * GB - prefill_act) // 1e6)
    assert epd["D"].kv_tokens == int((80 * GB - 14 * GB) // 1e6)
    assert epd["E"].kv_tokens == 0
    # Colocated encode weights cost KV room; the activation reserve is a max, not a sum.
    assert pd["P"].kv_tokens == int((80 * GB - 20 * GB - prefill_act) // 1e6)
    assert ed["D"].kv_tokens == int((80 * GB - 20 * GB - 8 * 1000 * 1e3) // 1e6)
    assert agg["N"].kv_tokens == pd["P"].kv_tokens
    assert epd["E"].max_encode_batch == int((80 * GB - 6 * GB) // 1e6)
    # A request that fits epd's decode GPU but not a colocated one.
    need = epd["D"].kv_tokens
    assert check_memory(p, DeployConfig("epd", 1, 1, 1, **kw), 1000, need, 100) is None
    assert "KV capacity" in check_memory(p, DeployConfig("ed", 1, 1, 1, **kw), 1000, need, 100)
    with pytest.raises(InvalidArgument, match="memory"):
        simulate(p, DeployConfig("ed", 1, 1, 1, **kw), [Request("x", 0, (1000,), 10, need - 1010)])


def test_early_stop_reports_an_upper_bound_below_target():
    p = linear_profile(prefill_fixed_s=1.0)
    reqs = [_text(i, i * 0.1) for i in range(200)]  # 10x overloaded
    slo = SLO(ttft_s=2.0, tpot_s=1.0, target=0.9)
    full = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), reqs, slo)
    early = simulate(
        p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), reqs, slo, stop_below=0.9
    )
    assert early.aborted and not full.aborted
    assert full.slo_attainment <= early.slo_attainment < 0.9
    assert early.completed < full.completed == 200


def test_modes_serve_a_mixed_workload_and_predict_is_deterministic():
    p = linear_profile(
        encode_fixed_s=0.003,
        encode_per_token_s=2e-5,
        prefill_fixed_s=0.005,
        prefill_per_token_s=4e-5,
        decode_fixed_s=0.008,
        decode_per_seq_s=5e-5,
    )
    spec = WorkloadSpec(IntDist.uniform(0, 3), IntDist.constant(256), IntDist.uniform(20, 80),
                        IntDist.uniform(1, 40))  # fmt: skip
    reqs = poisson_workload(spec, 300, seed=3).at_rate(10.0)
    for cfg in (
        DeployConfig("epd", 2, 1, 1, image_split=2),
        DeployConfig("pd", 2, 2, 1),
        DeployConfig("ed", 2, 1, 2, image_split=2),
        DeployConfig("aggregated", 2, 2, 2),
    ):
        res = simulate(p, cfg, reqs)
        assert res.completed == 300
        assert np.all(res.ttft_s > 0) and np.all(res.tpot_s >= 0)
        slo = SLO(1.0, 0.1)
        assert predict(p, cfg, reqs, slo) == predict(p, cfg, reqs, slo)
