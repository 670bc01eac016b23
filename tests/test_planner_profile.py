# SPDX-License-Identifier: Apache-2.0
"""Stage profiles: piecewise-linear models and their fits, JSON round trip and schema check,
the shipped estimated profile, the profiler on a fake runner with an injected clock, and
validation records."""

import json

import numpy as np
import pytest

from epdrt import InvalidArgument
from epdrt.planner import (
    Bilinear,
    DeployConfig,
    PiecewiseLinear,
    StageProfile,
    builtin_profiles,
    fit_bilinear,
    fit_piecewise_linear,
    load_profile,
)
from epdrt.planner.estimate import H100_SXM, QWEN2_VL_7B, estimate_profile
from epdrt.planner.profiler import (
    ProfileGrid,
    RunnerFacts,
    fit_transfer,
    measure_profile,
    transfer_from_records,
)
from epdrt.planner.synthetic import linear_profile
from epdrt.planner.validation import agreement, validation_records

BUILTIN = "qwen2-vl-7b-h100-estimated"


def test_piecewise_linear_interpolates_and_extrapolates():
    f = PiecewiseLinear((0.0, 10.0, 20.0), (1.0, 2.0, 4.0))
    assert f(5) == pytest.approx(1.5)
    assert f(15) == pytest.approx(3.0)
    assert f(30) == pytest.approx(6.0)  # last segment extended
    assert f(-10) == pytest.approx(0.0)  # first segment extended, clamped at 0
    assert PiecewiseLinear.constant(2.5)(1e9) == 2.5


def test_sum_arithmetic_matches_the_loop():
    f = PiecewiseLinear((0.0, 100.0, 300.0, 1000.0), (1.0, 2.0, 2.5, 9.0))
    for x0, dx, n in [(-50, 7, 60), (0, 0, 5), (250, 30, 100), (2000, 5, 3), (99, 1, 1)]:
        want = sum(f(x0 + j * dx) for j in range(n))
        assert f.sum_arithmetic(x0, dx, n) == pytest.approx(want, rel=1e-12)


def test_fit_piecewise_linear_recovers_a_piecewise_linear_function():
    truth = PiecewiseLinear((0.0, 512.0, 4096.0), (0.005, 0.006, 0.15))
    xs = [1, 64, 256, 512, 1000, 2048, 4096, 8192]
    fit = fit_piecewise_linear(xs, [truth(x) for x in xs], [0, 512, 4096])
    np.testing.assert_allclose(fit.values, truth.values, rtol=1e-9, atol=1e-12)
    assert fit(8192) == pytest.approx(truth(8192))


def test_fit_bilinear_recovers_a_bilinear_function():
    def fn(x, y):
        return 0.002 + 0.001 * x + 1e-5 * y + 3e-6 * x * y

    xs, ys = np.meshgrid([1, 2, 4, 8, 16], [64, 256, 1024])
    xs, ys = xs.ravel().tolist(), ys.ravel().tolist()
    fit = fit_bilinear(xs, ys, [fn(x, y) for x, y in zip(xs, ys)], [1, 16], [64, 1024])
    assert fit(5, 500) == pytest.approx(fn(5, 500), rel=1e-9)
    assert fit(32, 2048) == pytest.approx(fn(32, 2048), rel=1e-9)  # extrapolated


def test_bad_knots_are_rejected():
    with pytest.raises(InvalidArgument):
        PiecewiseLinear((1.0, 1.0), (0.0, 0.0))
    with pytest.raises(InvalidArgument):
        Bilinear((0.0, 1.0), (0.0,), ((1.0,),))


def test_profile_json_round_trip(tmp_path):
    p = linear_profile(encode_fixed_s=0.01, prefill_per_token_s=1e-4, decode_fixed_s=0.02)
    path = tmp_path / "p.json"
    p.save(path)
    q = StageProfile.load(path)
    assert q == p
    assert load_profile(str(path)) == p


@pytest.mark.parametrize("factor", [0.5, 1.3])
def test_scaled_profile_scales_every_batch_latency_and_nothing_else(factor):
    p = linear_profile(
        encode_fixed_s=0.01, encode_per_token_s=1e-4, prefill_fixed_s=0.02,
        prefill_per_token_s=1e-4, decode_fixed_s=0.005, decode_per_context_token_s=1e-6,
    )  # fmt: skip
    q = p.with_batches_scaled(factor)
    assert q.encode_latency(4, 64) == pytest.approx(factor * p.encode_latency(4, 64))
    assert q.prefill_batch_latency([100, 300], padded=True) == pytest.approx(
        factor * p.prefill_batch_latency([100, 300], padded=True)
    )
    assert q.decode_step_latency(8, 4000) == pytest.approx(factor * p.decode_step_latency(8, 4000))
    assert (q.overheads, q.memory, q.transfer) == (p.overheads, p.memory, p.transfer)
    with pytest.raises(InvalidArgument):
        p.with_batches_scaled(0.0)


def test_profile_schema_version_is_checked(tmp_path):
    d = linear_profile().to_dict()
    d["schema_version"] = 99
    with pytest.raises(InvalidArgument, match="schema_version"):
        StageProfile.from_dict(d)
    d = linear_profile().to_dict()
    del d["memory"]
    with pytest.raises(InvalidArgument, match="missing"):
        StageProfile.from_dict(d)
    with pytest.raises(InvalidArgument):
        load_profile("no-such-profile")


def test_shipped_profile_is_the_labelled_estimate():
    assert BUILTIN in builtin_profiles()
    p = load_profile(BUILTIN)
    assert p.source == "estimated"
    assert p.notes.startswith("ESTIMATE, NOT A MEASUREMENT")
    regenerated = estimate_profile(QWEN2_VL_7B, H100_SXM)
    assert json.loads(json.dumps(regenerated.to_dict())) == json.loads(json.dumps(p.to_dict()))


def test_estimate_arithmetic():
    m = QWEN2_VL_7B
    assert m.lm_params == pytest.approx(7.6e9, rel=0.01)
    assert m.vit_params == pytest.approx(0.675e9, rel=0.01)
    assert m.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    p = load_profile(BUILTIN)
    eff = H100_SXM.peak_flops * H100_SXM.mfu
    # Large prefill batches are compute-bound: tokens * FLOP/token / effective FLOP/s.
    want = 8192 * m.prefill_flops_per_token() / eff + H100_SXM.prefill_overhead_s
    assert p.prefill(8192) == pytest.approx(want, rel=1e-9)
    # A lone decode step is bound by reading the weights (minus the embedding table).
    read = (m.lm_params - m.vocab * m.lm_hidden) * 2
    want = read / H100_SXM.hbm_bytes_per_s + H100_SXM.decode_overhead_s
    assert p.decode(1, 0) == pytest.approx(want, rel=1e-9)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeRunner:
    """Advances a fake clock by known latencies; peak memory grows with the batch."""

    def __init__(self, clock):
        self.clock = clock
        self.peak = 0

    def facts(self):
        return RunnerFacts("fake", 1 << 30, 100, 1000, 64.0, 16.0)

    def tokens_per_image(self, image_size):
        return (image_size // 28) ** 2

    def _run(self, seconds, nbytes):
        self.clock.now += seconds
        self.peak = max(self.peak, nbytes)

    def encode(self, num_images, image_size):
        t = self.tokens_per_image(image_size)
        self._run(0.004 + num_images * (0.001 + 2e-6 * t), num_images * t * 300)

    def prefill(self, num_tokens, num_requests=1):
        # One request, then what each further request of a padded batch adds.
        seconds = max(0.005, num_tokens * 4e-5) + 0.001
        seconds += (num_requests - 1) * (0.0005 + 3e-5 * num_tokens)
        self._run(seconds, num_requests * num_tokens * 1000)

    def decode(self, batch_size, context_tokens):
        # As the real runner: each step of a shape appends a token to every sequence.
        if getattr(self, "shape", None) != (batch_size, context_tokens):
            self.shape, self.steps = (batch_size, context_tokens), 0
        context = context_tokens + self.steps
        self.steps += 1
        self._run(0.006 + 1e-5 * batch_size + 2e-9 * batch_size * context, 0)

    def synchronize(self):
        pass

    def reset_peak_memory(self):
        self.peak = 0

    def peak_memory_bytes(self):
        return self.peak


def test_profiler_fits_the_fake_runner_exactly():
    clock = FakeClock()
    runner = FakeRunner(clock)
    grid = ProfileGrid(
        encode_images=(1, 4, 16),
        image_sizes=(224, 448),
        prefill_tokens=(64, 125, 512, 2048),
        decode_batch=(1, 16, 64),
        decode_context=(512, 2048),
        warmup=1,
        repeats=3,
    )
    transfer = fit_transfer([1e6, 1e7, 1e8], [1e-4 + 1e6 / 5e10, 1e-4 + 1e7 / 5e10,
                                              1e-4 + 1e8 / 5e10])  # fmt: skip
    assert transfer.latency_s == pytest.approx(1e-4)
    assert transfer.bytes_per_s == pytest.approx(5e10)
    p = measure_profile(runner, transfer, name="fake", grid=grid, clock=clock)
    assert p.source == "measured" and p.device == "fake"
    for n in (1, 4, 16):
        for size in (224, 448):
            t = runner.tokens_per_image(size)
            assert p.encode(n, t) == pytest.approx(0.004 + n * (0.001 + 2e-6 * t), rel=1e-9)
    assert p.prefill(125) == pytest.approx(0.006, rel=1e-9)  # the kink, a knot
    assert p.prefill(2048) == pytest.approx(2048 * 4e-5 + 0.001, rel=1e-9)
    for t in (64, 125, 512, 1000, 2048):
        assert p.prefill_added(t) == pytest.approx(0.0005 + 3e-5 * t, rel=1e-9)
    # A padded batch: the longest request's prefill, the others each at the longest length.
    want = 2048 * 4e-5 + 0.001 + 2 * (0.0005 + 3e-5 * 2048)
    assert p.prefill_batch_latency([64, 512, 2048], padded=True) == pytest.approx(want)
    want = 2048 * 4e-5 + 0.001 + (0.0005 + 3e-5 * 64) + (0.0005 + 3e-5 * 512)
    assert p.prefill_batch_latency([64, 512, 2048]) == pytest.approx(want)
    assert [r[:2] for r in p.samples["prefill_batch"]] == [
        [b, t] for b in (4, 16) for t in (64, 125, 512, 2048)
    ]
    for b in (1, 16, 64):
        for c in (512, 2048, 1000):
            want = 0.006 + 1e-5 * b + 2e-9 * b * c
            assert p.decode(b, b * c) == pytest.approx(want, rel=1e-9)
    assert p.memory.encode_activation_bytes_per_token == pytest.approx(300)
    assert p.memory.prefill_activation_bytes_per_token == pytest.approx(1000)
    assert p.memory.kv_bytes_per_token == 64.0
    assert len(p.samples["decode"]) == 6


@pytest.mark.parametrize(
    ("run_s", "want_runs"), [(0.03, 4), (0.2, 3), (0.001, 25)]
)  # fmt: skip
def test_fast_shapes_are_timed_until_their_runs_add_up(run_s, want_runs):
    from epdrt.planner.profiler import time_runs

    clock = FakeClock()

    def fn():
        clock.now += run_s

    spread: list[float] = []
    times = time_runs(fn, lambda: None, clock, 1, 3, spread, min_seconds=0.1, max_repeats=25)
    assert len(times) == want_runs  # 3 at least, then until 0.1 s, at most 25
    assert times == pytest.approx([run_s] * want_runs)
    assert spread == pytest.approx([1.0] * 3)  # the first `repeats` runs only
    assert len(time_runs(fn, lambda: None, clock, 0, 3)) == 3  # no budget: exactly `repeats`


def test_transfer_from_benchmark_records():
    recs = [
        {"bench": "transfer", "metric": "GB/s", "value": b / (1e-5 + b / 2e10) / 1e9,
         "extra": {"bytes": b}}
        for b in (1 << 16, 1 << 20, 1 << 24)
    ] + [{"bench": "block-pool", "metric": "ops/s", "value": 1.0}]  # fmt: skip
    t = transfer_from_records(recs)
    assert t.latency_s == pytest.approx(1e-5, rel=1e-6)
    assert t.bytes_per_s == pytest.approx(2e10, rel=1e-6)
    with pytest.raises(InvalidArgument):
        transfer_from_records(recs[-1:])


def test_validation_records_hold_predicted_measured_and_min_over_max():
    cfg = DeployConfig("epd", 2, 1, 1, image_split=2)
    recs = validation_records(
        cfg, {"ttft_p90_s": 0.5, "throughput_rps": 10.0, "tpot_p90_s": 0.02},
        {"ttft_p90_s": 0.4, "throughput_rps": 12.5}, extra={"rate": 10.0},
    )  # fmt: skip
    assert [r.metric for r in recs] == ["ttft_p90_s", "throughput_rps"]
    assert all(r.bench == "planner" for r in recs)
    assert recs[0].value == 0.5 and recs[0].baseline_value == 0.4
    assert recs[0].ratio == pytest.approx(0.8)
    assert recs[1].ratio == pytest.approx(0.8)
    assert recs[0].extra["predicted"] == 0.5 and recs[0].extra["measured"] == 0.4
    assert recs[0].extra["rate"] == 10.0
    assert json.loads(recs[0].to_json())["case"].startswith("epd E2 P1 D1")
    assert agreement(0.0, 0.0) == 1.0


def test_transfer_from_the_transfer_benchmark_format():
    # `epdrt bench transfer` records: payload in extra.payload_bytes, per transport; latency
    # records ("us", one transfer alone) win over bandwidth records when both are there.
    def rec(metric, value, nbytes, transport="ipc"):
        return {"bench": "transfer", "metric": metric, "value": value,
                "extra": {"payload_bytes": nbytes, "transport": transport}}  # fmt: skip

    sizes = (1 << 12, 1 << 20, 1 << 24)
    recs = [rec("us", (2e-5 + b / 1e10) * 1e6, b) for b in sizes]
    recs += [rec("GB/s", 99.0, b) for b in sizes]
    recs += [rec("us", 1e6, b, transport="dist") for b in sizes]
    t = transfer_from_records(recs, transport="ipc")
    assert t.latency_s == pytest.approx(2e-5, rel=1e-6)
    assert t.bytes_per_s == pytest.approx(1e10, rel=1e-6)
    bw_only = transfer_from_records([r for r in recs if r["metric"] == "GB/s"])
    assert bw_only.bytes_per_s == pytest.approx(99e9, rel=1e-6)
    # Single transfers that get faster with size (a busy host): the streams decide.
    noisy = [rec("us", us, b) for us, b in zip((525.0, 450.0, 355.0), sizes)]
    noisy += [rec("GB/s", 99.0, b) for b in sizes]
    assert transfer_from_records(noisy).bytes_per_s == pytest.approx(99e9, rel=1e-6)
    with pytest.raises(InvalidArgument, match="grows with the payload"):
        transfer_from_records(noisy[:3])


def test_overheads_round_trip_and_default_to_zero():
    from dataclasses import replace

    from epdrt.planner.profile import Overheads

    o = Overheads(prepare_s=1e-4, prepare_per_image_s=2e-4, message_s=3e-5, wake_s=1e-3,
                  wake_tau_s=0.02, request_s=1e-3, step_s=1e-4,
                  request_spread=(-1e-4, 0.0, 2e-4), route_s=5e-4)  # fmt: skip
    p = replace(linear_profile(), overheads=o)
    assert StageProfile.from_dict(json.loads(json.dumps(p.to_dict()))).overheads == o
    d = p.to_dict()
    del d["overheads"]  # profiles written before overheads existed
    assert StageProfile.from_dict(d).overheads == Overheads()
    assert o.prepare(3) == pytest.approx(7e-4)
    assert o.router_work(3) == pytest.approx(7e-4 + 5e-4)
    assert o.wake(0.0) == 0.0
    assert o.wake(float("inf")) == pytest.approx(1e-3)
    assert o.wake(0.02) == pytest.approx(1e-3 * (1 - np.exp(-1)))
    assert Overheads().wake(1.0) == 0.0


def test_fit_wake_recovers_the_curve():
    from epdrt.planner.model_runner import fit_wake

    gaps = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25]
    extra = [1.5e-3 * (1 - np.exp(-g / 0.03)) for g in gaps]
    wake, tau = fit_wake(gaps, extra)
    assert wake == pytest.approx(1.5e-3, rel=0.03)
    assert tau == pytest.approx(0.03, rel=0.1)
    assert fit_wake(gaps, [-1e-5] * len(gaps))[0] == 0.0  # no penalty: none fitted


def test_observed_runs_become_simulator_inputs():
    from epdrt.planner.validation import (
        Observed,
        observed_metrics,
        observed_trace,
        runtime_deploy_config,
    )
    from epdrt.runtime.config import EPDConfig

    obs = [
        Observed("b", 0.5, (16, 16), 10, 4, 0.02, 0.002, 0.026),
        Observed("a", 0.0, (), 7, 1, 0.01, None, 0.01),
    ]
    trace = observed_trace(obs)
    assert [r.id for r in trace] == ["a", "b"]
    assert trace[1].input_tokens == 42 and trace[1].output_tokens == 4
    m = observed_metrics(obs)
    assert m["throughput_rps"] == pytest.approx(2 / 0.526)
    assert m["ttft_p90_s"] == pytest.approx(0.019)
    assert m["tpot_p50_s"] == pytest.approx(0.002)
    cfg = runtime_deploy_config(
        EPDConfig(mode="epd", num_encode=2, prefill_max_batch_tokens=512, decode_max_batch=32)
    )
    assert (cfg.pools, cfg.image_split, cfg.prefill_tokens) == ((2, 1, 1), 2, 512)
    assert not cfg.prefill_padded and not cfg.decode_padded and cfg.decode_batch == 32
    assert runtime_deploy_config(EPDConfig(mode="pd", num_prefill=2)).pools == (2, 1)
    aggregated = runtime_deploy_config(EPDConfig(mode="aggregated", num_prefill=3))
    assert aggregated.pools == (3,)


def test_decode_shapes_that_do_not_fit_are_skipped():
    g = ProfileGrid(decode_batch=(1, 8, 64), decode_context=(100, 400, 1000), warmup=1,
                    repeats=3, max_decode_tokens=8 * 1005)  # fmt: skip
    # Batch 8 keeps all three contexts (8 x 1005 fits); 64 keeps only 100: dropped.
    assert g.decode_shapes() == [(1, 100), (1, 400), (1, 1000), (8, 100), (8, 400), (8, 1000)]
    clock = FakeClock()
    p = measure_profile(FakeRunner(clock), fit_transfer([1.0, 2.0], [1.0, 2.0]), name="f",
                        grid=g, clock=clock)  # fmt: skip
    assert sorted({r[0] for r in p.samples["decode"]}) == [1, 8]
    assert p.decode(8, 8 * 400) == pytest.approx(0.006 + 8e-5 + 2e-9 * 8 * 400, rel=1e-9)
