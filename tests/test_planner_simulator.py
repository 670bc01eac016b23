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


def test_a_prompt_over_the_budget_is_prefilled_in_chunks_as_the_runtime_does():
    """epdrt.scheduler.prefill_chunks forms the steps: 40 tokens at 16 a step take three
    (16, 16, then 8 with a request of 8 that came meanwhile: the running chunk goes first)."""
    p = linear_profile(prefill_fixed_s=0.1, prefill_per_token_s=0.01)
    reqs = [_text(0, 0.0, prompt=40), _text(1, 0.05, prompt=8)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), reqs)
    end = 2 * (0.1 + 16 * 0.01) + (0.1 + 16 * 0.01)
    np.testing.assert_allclose(res.ttft_s, [end, end - 0.05], atol=1e-12)
    assert res.utilization["prefill"] == pytest.approx(1.0)


@pytest.mark.parametrize(("padded", "batch_s"), [(False, 0.1 + 48 * 0.01), (True, 0.1 + 64 * 0.01)])
def test_a_padded_prefill_batch_computes_requests_times_the_longest_prompt(padded, batch_s):
    # A 64-token request runs alone (0.74 s); prompts of 16 and 32 tokens queued meanwhile are
    # prefilled together: 48 tokens packed, 2 x 32 padded.
    p = linear_profile(prefill_fixed_s=0.1, prefill_per_token_s=0.01)
    reqs = [_text(0, 0.0, prompt=64), _text(1, 0.01, prompt=16), _text(2, 0.01, prompt=32)]
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=64, prefill_padded=padded)
    res = simulate(p, cfg, reqs)
    first = 0.1 + 64 * 0.01
    np.testing.assert_allclose(
        res.ttft_s, [first, first + batch_s - 0.01, first + batch_s - 0.01], atol=1e-12
    )


@pytest.mark.parametrize(("padded", "batches"), [(False, [[1, 2, 3]]), (True, [[1, 2], [3]])])
def test_a_padded_budget_counts_requests_times_the_longest_prompt(padded, batches):
    # Z (0.1 s) runs while prompts of 10, 10 and 40 tokens queue; budget 64: packed they fit
    # (60 tokens), padded the third would make 3 x 40.
    p = linear_profile(prefill_fixed_s=0.1)
    reqs = [_text(0, 0.0, prompt=64)] + [
        _text(i, 0.01, prompt=n) for i, n in ((1, 10), (2, 10), (3, 40))
    ]
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=64, prefill_padded=padded)
    res = simulate(p, cfg, reqs)
    want = [0.1] + [0.1 * (2 + b) - 0.01 for b, batch in enumerate(batches) for _ in batch]
    np.testing.assert_allclose(res.ttft_s, want, atol=1e-12)


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


@pytest.mark.parametrize("handoff", ["pull", "layerwise"])
def test_epd_pipeline_times_are_sums_of_known_latencies(handoff):
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
    cfg = DeployConfig("epd", 2, 1, 1, image_split=2, kv_handoff=handoff)
    res = simulate(p, cfg, [req])
    encode = 0.05 + 0.01  # one image per encoder, in parallel
    mm = 0.001 + 100 * 1000 / 1e9
    prefill = 0.1 + 250 * 1e-4
    # Pulled after the prefill; pushed while it runs (its 1.5 ms fit in the prefill's 125).
    kv = 0.001 + 250 * 2000 / 1e9 if handoff == "pull" else 0.0
    assert res.ttft_s[0] == pytest.approx(encode + mm + prefill, abs=1e-12)
    assert res.tpot_s[0] == pytest.approx((kv + 5 * 0.02) / 5, abs=1e-12)
    # Split 1: both images in one batch on one encoder, one larger MM transfer.
    res1 = simulate(p, DeployConfig("epd", 2, 1, 1, image_split=1), [req])
    mm1 = 0.001 + 200 * 1000 / 1e9
    assert res1.ttft_s[0] == pytest.approx(0.05 + 2 * 0.01 + mm1 + prefill, abs=1e-12)
    # pd: encode on the prefill GPU, no MM transfer.
    resp = simulate(p, DeployConfig("pd", 1, 1, 1), [req])
    assert resp.ttft_s[0] == pytest.approx(0.05 + 2 * 0.01 + prefill, abs=1e-12)


def test_the_decoder_pulls_a_requests_kv_while_its_prefill_gpu_runs_the_next_batch():
    # r0 and r1 prefill back to back (0.1 s each). r0's KV does not wait for r1's batch: the
    # decode GPU pulls it (the KVReady message, the copy) while r1's batch runs.
    p = _with_overheads(
        linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01, transfer_latency_s=0.001),
        message_s=1e-3,
    )
    reqs = [_text(0, 0.0, out=2), _text(1, 0.0, out=2)]
    res = simulate(p, DeployConfig("pd", 1, 1, 1, prefill_tokens=16, kv_handoff="pull"), reqs)
    end = 1e-3 + 0.1  # the router's message to the worker, r0's prefill
    first = end + 1e-3  # the first token reaches the client
    # KVReady 1 ms, the copy 1 ms; one step; the last token's message
    finish = end + 1e-3 + 1e-3 + 0.01 + 1e-3
    assert res.ttft_s[0] == pytest.approx(first, abs=1e-12)
    assert res.tpot_s[0] == pytest.approx(finish - first, abs=1e-12)


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


@pytest.mark.parametrize(("padded", "first_step_s"), [(False, 0.042), (True, 0.062)])
def test_a_padded_decode_step_counts_every_sequence_at_the_longest_context(padded, first_step_s):
    # 1 ms per context token. A (30-token prompt) and B (10) queue behind Z's prefill, are
    # prefilled together and decode their first step together: 31 + 11 tokens summed, 2 x 31
    # padded. A then finishes; B steps alone at 12 and 13 tokens (the finished longest
    # sequence no longer counts).
    p = linear_profile(prefill_fixed_s=0.1, decode_per_context_token_s=0.001)
    z = _text(0, 0.0, prompt=16, out=1)
    a, b = _text(1, 0.01, prompt=30, out=2), _text(2, 0.01, prompt=10, out=4)
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=64, decode_padded=padded)
    res = simulate(p, cfg, [z, a, b])
    assert res.ttft_s[1] == res.ttft_s[2] == pytest.approx(0.19, abs=1e-12)
    assert res.tpot_s[1] == pytest.approx(first_step_s, abs=1e-12)
    assert res.tpot_s[2] == pytest.approx((first_step_s + 0.012 + 0.013) / 3, abs=1e-12)


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


def test_colocated_stages_take_turns_so_decode_does_not_starve():
    # One GPU; prefills (0.1 s) arrive faster than it serves them. The running sequence still
    # gets one decode step (0.01 s) between two prefills: its first step right after its own
    # prefill, then a token every 0.11 s (prefill-first would hold them all for 1.1 s).
    p = linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01)
    reqs = [_text(0, 0.0, out=6)] + [_text(i, 0.001 + 0.05 * (i - 1)) for i in range(1, 12)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), reqs)
    assert res.ttft_s[0] == pytest.approx(0.1, abs=1e-12)
    assert res.tpot_s[0] == pytest.approx((0.01 + 4 * 0.11) / 5, abs=1e-12)
    # Request 1 waited for request 0's prefill and first decode step.
    assert res.ttft_s[1] == pytest.approx(0.11 + 0.1 - 0.001, abs=1e-12)


def _small_kv(tokens: int, **kw):
    """A profile whose GPUs hold KV for ``tokens`` tokens."""
    return linear_profile(
        device_bytes=1000 + tokens, lm_weight_bytes=1000, encode_weight_bytes=0,
        kv_bytes_per_token=1, **kw,
    )  # fmt: skip


def test_kv_capacity_back_pressure_completes_everything_in_waves():
    # KV for 300 tokens per GPU; each prompt needs 100 and grows by 49: two fit beside the
    # decoder's headroom (a 16-token block per running sequence), so they run in waves.
    p = _small_kv(300, decode_fixed_s=0.01)
    reqs = [_text(i, 0.0, prompt=100, out=50) for i in range(6)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=100), reqs)
    assert res.completed == 6 and res.preemptions == 0
    finish = np.sort(res.ttft_s + res.tpot_s * 49)
    # Three waves of two: the pair of a wave ends within a decode step (its second request
    # was prefilled after the first's first decode step), waves ~0.5 s apart.
    waves = np.split(finish, np.flatnonzero(np.diff(finish) > 0.1) + 1)
    assert [len(w) for w in waves] == [2, 2, 2]
    assert all(w[-1] - w[0] <= 0.01 + 1e-9 for w in waves)


@pytest.mark.parametrize("mode", ["pd", "aggregated"])
def test_a_full_decode_cache_preempts_the_newest_sequence_which_is_recomputed(mode):
    """KV grows a token per step (scheduler.decode_admit / growth_preemptions): two 100-token
    prompts fit in 300 tokens but not their 99 output tokens each. When the cache fills, the
    newest is evicted and prefilled again with what it generated; the oldest never waits."""
    p = _small_kv(300, decode_fixed_s=0.01)
    reqs = [_text(i, 0.0, prompt=100, out=100) for i in range(3)]
    cfg = DeployConfig(mode, 1, 1, 1, prefill_tokens=256, kv_block=1)
    res = simulate(p, cfg, reqs)
    assert res.completed == 3
    assert res.preemptions >= 1
    assert res.tpot_s[0] == pytest.approx(0.01, abs=1e-12)  # 99 steps, never preempted
    assert res.tpot_s[1] > 0.011  # it lost its KV and decoded again
    # Reserving prompt + output up front (the old rule) would have run one at a time.
    assert res.duration_s < 3 * 99 * 0.01


def test_more_running_sequences_than_the_decode_batch_take_turns():
    # max_num_seqs 4, decode_batch 2: all four run, each step decodes two of them, so each
    # gets a token every two steps and all end within a step or two of each other (the first
    # stepped once alone before the others landed); without it, two wait for two (their
    # prefills wait for a decoder slot: layer-wise hand-off).
    p = linear_profile(decode_fixed_s=0.01)
    reqs = [_text(i, 0.0, out=11) for i in range(4)]

    def finish(cfg: DeployConfig) -> np.ndarray:
        res = simulate(p, cfg, reqs)
        return np.sort(res.ttft_s + 10 * res.tpot_s)

    turns = finish(DeployConfig("pd", 1, 1, 1, decode_batch=2, max_num_seqs=4))
    np.testing.assert_allclose(turns, [0.19, 0.21, 0.21, 0.21], atol=1e-12)
    waves = finish(DeployConfig("pd", 1, 1, 1, decode_batch=2))
    np.testing.assert_allclose(waves, [0.1, 0.11, 0.21, 0.22], atol=1e-12)


def test_a_layerwise_prefill_starts_once_its_decoder_gave_blocks_and_waits_for_its_push():
    """b's KVReserve reaches a decoder in the middle of a's decode steps: it is admitted at
    the step boundary (0.11), and only then may b's prefill start. A push slower than the
    prefill lengthens the step: it ends once the last byte has landed."""
    p = linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01)
    a, b = _text(0, 0.0, out=21), _text(1, 0.105, out=3)
    res = simulate(p, DeployConfig("pd", 1, 1, 1, prefill_tokens=16), [a, b])
    assert res.ttft_s[1] == pytest.approx(0.11 + 0.1 - 0.105, abs=1e-12)
    pull = simulate(p, DeployConfig("pd", 1, 1, 1, prefill_tokens=16, kv_handoff="pull"), [a, b])
    assert pull.ttft_s[1] == pytest.approx(0.1, abs=1e-12)
    slow = linear_profile(
        prefill_fixed_s=0.1, decode_fixed_s=0.01, transfer_latency_s=0.001,
        transfer_bytes_per_s=1000.0, kv_bytes_per_token=10,
    )  # fmt: skip
    res = simulate(slow, DeployConfig("pd", 1, 1, 1, prefill_tokens=16), [a])
    assert res.ttft_s[0] == pytest.approx(0.001 + 16 * 10 / 1000.0, abs=1e-12)


def test_a_request_waiting_for_its_decoder_holds_no_other_prefill_up():
    # One decoder slot (max_num_seqs 1): r1 waits for it, but r2, routed to the other
    # decoder, prefills at once although it queued behind r1.
    p = linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01)
    reqs = [_text(0, 0.0, out=11), _text(1, 0.0, out=11), _text(2, 0.0, out=11)]
    cfg = DeployConfig("pd", 1, 1, 2, prefill_tokens=16, decode_batch=1)
    res = simulate(p, cfg, reqs)
    # r0 (decoder 0) and r2 (decoder 1... routed by load) prefill first; r1 waits for r0.
    assert sorted(np.round(res.ttft_s, 9))[:2] == [0.1, 0.2]
    assert res.completed == 3


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


def _with_overheads(p, **kw):
    from dataclasses import replace

    from epdrt.planner.profile import Overheads

    return replace(p, overheads=Overheads(**kw))


def test_the_routers_tokens_messages_compete_for_shared_cores_and_delay_no_token():
    # Each decode step sends the router a tokens message worth 10 ms of its CPU.
    p = _with_overheads(
        linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.02), token_message_s=0.01
    )
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    reqs = [_text(0, 0.0, out=6), _text(1, 0.2)]
    alone = simulate(p, cfg, reqs)
    np.testing.assert_allclose(alone.ttft_s, [0.1, 0.1], atol=1e-12)
    assert alone.tpot_s[0] == pytest.approx(0.02, abs=1e-12)
    assert alone.work_s["router"] == pytest.approx(5 * 0.01, abs=1e-12)
    # One core: r0's five steps end at 0.2 s, the router then takes in their 50 ms of messages
    # while r1's prefill runs, both at half speed until 0.3 s; the prefill's last 50 ms alone.
    shared = simulate(p, cfg, reqs, host_cores=1)
    np.testing.assert_allclose(shared.ttft_s, [0.1, 0.15], atol=1e-12)
    assert shared.tpot_s[0] == pytest.approx(0.02, abs=1e-12)


def test_runtime_overheads_are_sums_of_known_costs():
    # Router: 1 ms + 0.5 ms per image (+ 0.2 ms); each control message 0.1 ms; no wake-up.
    p = _with_overheads(
        linear_profile(
            encode_fixed_s=0.05, prefill_fixed_s=0.1, decode_fixed_s=0.02,
            transfer_latency_s=0.001, transfer_bytes_per_s=1e30,
        ),
        prepare_s=1e-3, prepare_per_image_s=5e-4, message_s=1e-4, request_s=2e-4, route_s=3e-4,
    )  # fmt: skip
    req = Request("a", 0.0, (100, 100), 50, 6)
    # The router's work (preprocessing, the rest of its CPU per request), the message to the
    # workers, the calibrated rest of the router's path.
    router_work = 1e-3 + 2 * 5e-4 + 3e-4
    router = router_work + 1e-4 + 2e-4
    res = simulate(p, DeployConfig("epd", 1, 1, 1, kv_handoff="pull"), [req])
    # The work each process ran: one encode batch, one prefill, five decode steps.
    want = {"E0": 0.05, "P0": 0.1, "D0": 5 * 0.02, "router": router_work}
    assert res.work_s == pytest.approx(want, abs=1e-12)
    # MM tokens: the copy, then a "ready" message; the first token: one message back.
    assert res.ttft_s[0] == pytest.approx(router + 0.05 + 0.001 + 1e-4 + 0.1 + 1e-4, abs=1e-12)
    # KV hand-off: KVReady and the copy; the last token's message cancels the first's.
    assert res.tpot_s[0] == pytest.approx((0.001 + 1e-4 + 5 * 0.02) / 5, abs=1e-12)
    # Layer-wise: KVReserve and KVDest went while the images encoded; the push overlapped
    # the prefill; KVReady(pushed) reaches the decoder a message after the step.
    push = simulate(p, DeployConfig("epd", 1, 1, 1), [req])
    assert push.ttft_s[0] == res.ttft_s[0]
    assert push.tpot_s[0] == pytest.approx((1e-4 + 5 * 0.02) / 5, abs=1e-12)
    agg = simulate(p, DeployConfig("aggregated", 1, 1, 1), [req])
    assert agg.ttft_s[0] == pytest.approx(router + 0.05 + 0.1 + 1e-4, abs=1e-12)
    assert agg.tpot_s[0] == pytest.approx(0.02, abs=1e-12)
    assert agg.work_s == pytest.approx({"N0": 0.05 + 0.1 + 5 * 0.02, "router": router_work})


def test_the_routers_cpu_work_takes_its_share_of_shared_cores():
    # One core: a prefill of 0.1 s starts with the router busy on the next request for 0.04 s
    # (preprocessing 0.01 s + 0.03 s of further routing work), so both run at half speed.
    p = _with_overheads(linear_profile(prefill_fixed_s=0.1), prepare_s=0.01, route_s=0.03)
    reqs = [_text(0, 0.0), _text(1, 0.04)]
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    alone = simulate(p, cfg, reqs)
    assert alone.ttft_s[0] == pytest.approx(0.14, abs=1e-12)
    shared = simulate(p, cfg, reqs, host_cores=1)
    # r0: routed alone (0.04 s), then its prefill shares the core for 0.08 s with r1's routing
    # (0.04 s of work at half speed), then runs alone for the 0.06 s left.
    assert shared.ttft_s[0] == pytest.approx(0.04 + 0.08 + 0.06, abs=1e-12)
    assert shared.work_s["router"] == pytest.approx(0.08, abs=1e-12)


def test_router_preprocesses_one_request_at_a_time():
    p = _with_overheads(linear_profile(prefill_fixed_s=0.01), prepare_s=0.05)
    reqs = [_text(0, 0.0), _text(1, 0.01)]
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16), reqs)
    assert res.ttft_s[0] == pytest.approx(0.06, abs=1e-12)
    assert res.ttft_s[1] == pytest.approx(0.1 + 0.01 - 0.01, abs=1e-12)  # waits for the router


def test_wake_up_cost_grows_with_the_idle_gap():
    # A batch started after g idle seconds costs 2 ms * (1 - exp(-g / 10 ms)) more.
    import math

    p = _with_overheads(linear_profile(prefill_fixed_s=0.01), wake_s=2e-3, wake_tau_s=1e-2)
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    reqs = [_text(0, 0.0), _text(1, 0.0), _text(2, 0.02 + 2e-3 + 0.005)]
    res = simulate(p, cfg, reqs)
    # r0: cold GPU (idle forever: the full 2 ms); r1 right behind it: warm; r2 after a gap.
    assert res.ttft_s[0] == pytest.approx(0.012, abs=1e-12)
    assert res.ttft_s[1] == pytest.approx(0.022, abs=1e-12)
    gap = reqs[2].arrival_s - 0.022
    want = 0.01 + 2e-3 * (1 - math.exp(-gap / 1e-2))
    assert res.ttft_s[2] == pytest.approx(want, abs=1e-12)
    # Decode steps run back to back: only the first step after idling pays.
    d = _with_overheads(linear_profile(decode_fixed_s=0.01), wake_s=2e-3, wake_tau_s=1e-2)
    one = simulate(d, DeployConfig("aggregated", 1, 1, 1), [_text(0, 0.0, out=11)])
    assert one.ttft_s[0] == pytest.approx(2e-3, abs=1e-12)  # a cold (instant) prefill
    assert one.tpot_s[0] == pytest.approx(0.01, abs=1e-12)  # warm from then on


def test_the_wake_up_cost_is_the_workers_not_the_routers():
    # A cold start: the router's 10 ms of preprocessing pays no wake-up (its CPU after idling
    # is in its calibrated route_s), each cold worker's first batch does (2 ms).
    base = linear_profile(encode_fixed_s=0.05, prefill_fixed_s=0.1, decode_fixed_s=0.02)
    p = _with_overheads(base, prepare_s=0.01, wake_s=2e-3)
    req = Request("a", 0.0, (100,), 50, 3)
    epd = simulate(p, DeployConfig("epd", 1, 1, 1), [req])
    assert epd.ttft_s[0] == pytest.approx(0.01 + 0.05 + 2e-3 + 0.1 + 2e-3, abs=1e-12)
    assert epd.tpot_s[0] == pytest.approx((2e-3 + 2 * 0.02) / 2, abs=1e-12)  # D's first step
    assert epd.work_s["router"] == pytest.approx(0.01, abs=1e-12)
    agg = simulate(p, DeployConfig("aggregated", 1, 1, 1), [req])
    assert agg.ttft_s[0] == pytest.approx(0.01 + 2e-3 + 0.05 + 0.1, abs=1e-12)  # one cold start


def test_shared_host_cores_slow_overlapping_batches_down():
    # Processor sharing: n busy workers on c cores each run at min(1, c / n) of full speed.
    p = linear_profile(prefill_fixed_s=0.1)
    two = [_text(0, 0.0), _text(1, 0.0)]
    cfg = DeployConfig("aggregated", 2, 2, 2, prefill_tokens=16)
    np.testing.assert_allclose(simulate(p, cfg, two).ttft_s, [0.1, 0.1], atol=1e-12)
    np.testing.assert_allclose(simulate(p, cfg, two, host_cores=2).ttft_s, [0.1, 0.1])
    np.testing.assert_allclose(simulate(p, cfg, two, host_cores=1).ttft_s, [0.2, 0.2])
    three = DeployConfig("aggregated", 3, 3, 3, prefill_tokens=16)
    res = simulate(p, three, [_text(i, 0.0) for i in range(3)], host_cores=2)
    np.testing.assert_allclose(res.ttft_s, [0.15] * 3, atol=1e-12)
    # Staggered: r0 alone for 0.05 s, then both at half speed; r1 finishes alone.
    res = simulate(p, cfg, [_text(0, 0.0), _text(1, 0.05)], host_cores=1)
    np.testing.assert_allclose(res.ttft_s, [0.15, 0.15], atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_processes_running_at_once_slow_each_other_by_the_interference(alpha):
    # Two at once on 2 cores each run at 1 / (1 + alpha); three share 2 cores at 2/3 of that;
    # one alone is not slowed.
    p = linear_profile(prefill_fixed_s=0.1)
    cfg = DeployConfig("aggregated", 3, 3, 3, prefill_tokens=16)

    def ttft(n: int) -> np.ndarray:
        reqs = [_text(i, 0.0) for i in range(n)]
        return simulate(p, cfg, reqs, host_cores=2, host_interference=alpha).ttft_s

    np.testing.assert_allclose(ttft(1), [0.1], atol=1e-12)
    np.testing.assert_allclose(ttft(2), [0.1 * (1 + alpha)] * 2, atol=1e-12)
    np.testing.assert_allclose(ttft(3), [0.15 * (1 + alpha)] * 3, atol=1e-12)
    with pytest.raises(InvalidArgument):
        simulate(p, cfg, [_text(0, 0.0)], host_cores=2, host_interference=-0.1)


def test_pinned_workers_keep_their_cores_and_the_router_takes_a_free_one():
    # Two workers, two cores; the router preprocesses three requests (10 ms each) while the
    # workers prefill the first two (0.1 s each); the third queues behind the first.
    p = _with_overheads(linear_profile(prefill_fixed_s=0.1), prepare_s=0.01)
    reqs = [_text(i, 0.0) for i in range(3)]
    cfg = DeployConfig("aggregated", 2, 2, 2, prefill_tokens=16)
    pinned = simulate(p, cfg, reqs, host_cores=2, host_pinned=True)
    # r1's preprocessing ran on the free core 1; r2's found none free and shared its last
    # core, 1, with N1's prefill (both at half speed for 20 ms): N0 kept its core.
    np.testing.assert_allclose(pinned.ttft_s, [0.11, 0.13, 0.21], atol=1e-12)
    # Pooled cores: the three share two, each at 2/3 speed while r2 is preprocessed.
    pooled = simulate(p, cfg, reqs, host_cores=2)
    np.testing.assert_allclose(pooled.ttft_s, [0.115, 0.125, 0.215], atol=1e-12)
    # More workers than cores: nothing is pinned.
    three = DeployConfig("aggregated", 3, 3, 3, prefill_tokens=16)
    np.testing.assert_allclose(
        simulate(p, three, reqs, host_cores=2, host_pinned=True).ttft_s,
        simulate(p, three, reqs, host_cores=2).ttft_s,
    )


def test_shared_cores_stretch_decode_steps_and_their_boundaries():
    # pd on one core: a decodes 20 steps of 10 ms from 0.1; b's prefill (0.105-0.305) halves
    # both. b's KVReady is admitted at the step boundary after 0.305 (work 0.11 = step 11,
    # at 0.31), where its pull starts; b joins at the next one (0.32), as in the runtime.
    p = linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01)
    a, b = _text(0, 0.0, out=21), _text(1, 0.105, out=3)
    cfg = DeployConfig("pd", 1, 1, 1, prefill_tokens=16, kv_handoff="pull")
    res = simulate(p, cfg, [a, b], host_cores=1)
    assert res.ttft_s[1] == pytest.approx(0.2, abs=1e-9)
    assert res.tpot_s[0] == pytest.approx((0.40 - 0.1) / 20, abs=1e-9)
    assert res.tpot_s[1] == pytest.approx((0.34 - 0.305) / 2, abs=1e-9)
    alone = simulate(p, cfg, [a, b], host_cores=2)
    assert alone.tpot_s[0] == pytest.approx(0.01, abs=1e-9)


def test_jitter_scales_batches_by_draws_from_the_profiles_spread():
    from dataclasses import replace

    p = linear_profile(prefill_fixed_s=0.1, decode_fixed_s=0.01)
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    reqs = [_text(0, 0.0, out=11)]
    slow = simulate(replace(p, jitter=(2.0, 2.0)), cfg, reqs)  # every batch twice as long
    assert slow.ttft_s[0] == pytest.approx(0.2, abs=1e-12)
    assert slow.tpot_s[0] == pytest.approx(0.02, abs=1e-12)
    # A spread: each lone prefill's time is a draw, uniform on [0.8, 1.6] x 0.1 s here.
    spread = replace(p, jitter=(0.8, 1.0, 1.6))
    many = [_text(i, float(i)) for i in range(2000)]
    res = simulate(spread, cfg, many)
    assert res.ttft_s.min() >= 0.08 - 1e-12 and res.ttft_s.max() <= 0.16 + 1e-12
    assert np.median(res.ttft_s) == pytest.approx(0.1, rel=0.03)
    assert np.mean(res.ttft_s) == pytest.approx(0.1 * (0.9 + 1.3) / 2, rel=0.03)
    np.testing.assert_array_equal(simulate(spread, cfg, many).ttft_s, res.ttft_s)  # seeded
    with pytest.raises(InvalidArgument, match="jitter"):
        replace(p, jitter=(1.2, 1.0))


def test_calibrated_step_overhead_lengthens_every_decode_step():
    # Steps of 10 ms + 2 ms of runtime work; b joins a's batch at a step boundary (0.024).
    p = _with_overheads(linear_profile(decode_fixed_s=0.01), step_s=2e-3)
    a, b = _text(0, 0.0, out=11), _text(1, 0.015, out=3)
    res = simulate(p, DeployConfig("aggregated", 1, 1, 1), [a, b])
    assert res.ttft_s[1] == pytest.approx(0.024 - 0.015, abs=1e-12)
    assert res.tpot_s[0] == pytest.approx(0.012, abs=1e-12)
    assert res.tpot_s[1] == pytest.approx(0.012, abs=1e-12)


def test_request_latency_spread_is_drawn_per_request():
    # request_s 20 ms, spread quantiles -10 / 0 / +10 ms: uniform on [10, 30] ms, never < 0.
    p = _with_overheads(
        linear_profile(prefill_fixed_s=0.001), request_s=0.02, request_spread=(-0.01, 0.0, 0.01)
    )
    cfg = DeployConfig("aggregated", 1, 1, 1, prefill_tokens=16)
    res = simulate(p, cfg, [_text(i, float(i)) for i in range(2000)])
    assert res.ttft_s.min() >= 0.011 - 1e-12 and res.ttft_s.max() <= 0.031 + 1e-12
    assert np.quantile(res.ttft_s, 0.9) == pytest.approx(0.001 + 0.028, rel=0.03)
    low = _with_overheads(linear_profile(prefill_fixed_s=0.001), request_spread=(-1.0, -1.0))
    assert simulate(low, cfg, [_text(0, 0.0)]).ttft_s[0] == pytest.approx(0.001)  # clamped
