# SPDX-License-Identifier: Apache-2.0
"""The capacity benchmark on the tiny Qwen2-VL with a 10 MiB budget: well-formed records,
the memory EPD is expected to win, and out-of-memory errors during the probe caught."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from epdrt.bench import BENCHMARKS, capacity
from epdrt.bench._capacity_probe import (
    Curve,
    DeviceOutOfMemory,
    Ledger,
    grow,
    is_oom,
    largest_fitting,
)
from epdrt.benchmarking import Record
from epdrt.models import make_tiny_model

KEYS = ("bench", "case", "metric", "value", "baseline", "baseline_value", "ratio", "device",
        "date", "commit", "extra")  # fmt: skip
TINY_ARGS = [
    "--memory-budget", "0.01", "--image-size", "112", "--encode-batch", "4",
    "--prefill-tokens", "64", "--output-tokens", "16", "--mm-cache-tokens", "256",
    "--max-forward-images", "64", "--max-forward-tokens", "512", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("capacity") / "tiny-qwen2-vl"
    make_tiny_model(path, "qwen2-vl", seed=0)
    return str(path)


def _args(model: str, *extra: str, plot: Path | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    capacity.add_arguments(parser)
    args = parser.parse_args(["--model", model, *TINY_ARGS, *extra])
    args.json = None
    args.plot = str(plot) if plot else None
    return args


def _by(records: list[Record], quantity: str, mode: str, base: str) -> Record:
    (r,) = [
        r
        for r in records
        if r.extra["quantity"] == quantity
        and "per GPU" not in r.metric
        and r.extra["deployment"] == mode
        and r.extra["baseline_deployment"] == base
    ]
    return r


@pytest.fixture(scope="module")
def full_run(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Record], Path]:
    png = tmp_path_factory.mktemp("capacity-plot") / "capacity.png"
    return capacity.run(_args(tiny, plot=png)), png


def test_registered() -> None:
    assert BENCHMARKS["capacity"] is capacity


def test_records_are_well_formed(full_run: tuple[list[Record], Path]) -> None:
    records, png = full_run
    quantities = set(capacity.QUANTITIES)
    assert {r.extra["quantity"] for r in records} == quantities
    # Every quantity: epd vs aggregated, epd vs pd, pd vs aggregated; the quantities that add
    # up over devices once more per GPU of the deployment.
    per_device = [r for r in records if "per GPU" not in r.metric]
    per_gpu = [r for r in records if "per GPU" in r.metric]
    assert len(per_device) == 3 * len(quantities)
    assert len(per_gpu) == 3 * len(capacity.PER_GPU)
    for r in per_gpu:
        q, d = r.extra["quantity"], r.extra["deployment"]
        same = _by(records, q, d, r.extra["baseline_deployment"])
        assert r.value * r.extra["gpus"] == pytest.approx(same.value)
        assert r.baseline_value * r.extra["baseline_gpus"] == pytest.approx(same.baseline_value)
        assert r.ratio == pytest.approx(r.value / r.baseline_value)
    for r in per_device:
        row = json.loads(r.to_json())
        assert all(k in row for k in KEYS)
        assert row["bench"] == "capacity" and row["device"] == "cpu"
        assert math.isfinite(r.value) and r.value > 0
        assert math.isfinite(r.baseline_value) and r.baseline_value > 0
        _, _, higher = capacity.QUANTITIES[r.extra["quantity"]]
        want = r.value / r.baseline_value if higher else r.baseline_value / r.value
        assert r.ratio == pytest.approx(want)
        assert set(r.extra["estimate"]) == {"estimate", "estimate_measured_units"}
        assert r.extra["method"] and r.extra["breakdown_bytes"]
        assert r.extra["ooms"]["real"] == 0  # nothing here raises a real OOM
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epd_holds_more(full_run: tuple[list[Record], Path]) -> None:
    records, _ = full_run
    peak = _by(records, "encoder_peak_memory", "epd", "aggregated")
    assert peak.value < peak.baseline_value  # no LM weights, no KV on the encoder
    assert "LM weights" not in peak.extra["breakdown_bytes"]
    batch = _by(records, "max_encoder_batch", "epd", "aggregated")
    assert batch.value >= batch.baseline_value
    kv = _by(records, "kv_tokens_prefill", "epd", "aggregated")
    assert kv.value > kv.baseline_value  # no vision tower, no encoder activations
    kv_d = _by(records, "kv_tokens_decode", "epd", "aggregated")
    assert kv_d.value > kv_d.baseline_value
    images = _by(records, "max_images_per_request", "epd", "aggregated")
    assert images.value >= images.baseline_value
    # The measurement stays within the budget it was given.
    budget = kv.extra["setup"]["budget_bytes"]
    assert sum(kv.extra["breakdown_bytes"].values()) <= budget
    assert sum(kv.extra["baseline_breakdown_bytes"].values()) <= budget


def test_oom_during_probe_is_caught(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KV cache over 300 blocks raises MemoryError and an encoder batch over 5 images raises
    torch.OutOfMemoryError: both are caught, the pools shrink, the benchmark returns."""
    import epdrt.cache
    from epdrt.models.base import ModelAdapter

    real_kv = epdrt.cache.PagedKVCache
    real_encode = ModelAdapter.encode

    class FailingKV(real_kv):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            if args[4] > 300:  # num_blocks
                raise MemoryError("simulated: cannot allocate the KV region")
            super().__init__(*args, **kwargs)

    def failing_encode(self: ModelAdapter, images: list) -> list[torch.Tensor]:
        if len(images) > 5:
            raise torch.OutOfMemoryError("simulated: out of memory in the vision tower")
        return real_encode(self, images)

    monkeypatch.setattr(epdrt.cache, "PagedKVCache", FailingKV)
    monkeypatch.setattr(ModelAdapter, "encode", failing_encode)
    records = capacity.run(_args(tiny, "--modes", "aggregated,epd"))
    assert {r.extra["quantity"] for r in records} == set(capacity.QUANTITIES)
    for quantity in ("kv_tokens_prefill", "kv_tokens_decode"):
        r = _by(records, quantity, "epd", "aggregated")
        assert 0 < r.value <= 300 * 16 and 0 < r.baseline_value <= 300 * 16
        assert r.extra["ooms"]["real"] > 0
    batch = _by(records, "max_encoder_batch", "epd", "aggregated")
    assert batch.value == batch.baseline_value == 5


def test_grow_finds_the_limit_allocating_each_unit_about_once() -> None:
    held: list[int] = []
    tries = []

    def add(total: int, step: int) -> None:
        tries.append(step)
        if total + step > 1000:
            raise MemoryError
        held.append(step)

    assert grow(add) == 1000
    assert sum(held) == 1000
    assert len(tries) < 2 * 11 + 2

    def never(total: int, step: int) -> None:
        raise torch.OutOfMemoryError("out of memory")

    assert grow(never) == 0

    def broken(total: int, step: int) -> None:
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        grow(broken)


def test_largest_fitting() -> None:
    for limit in (0, 1, 7, 64, 1000):
        assert largest_fitting(lambda n, lim=limit: n <= lim, 1000) == limit
    assert largest_fitting(lambda n: True, 0) == 0


def test_ledger_refuses_past_the_budget() -> None:
    ledger = Ledger("dev", budget=100)
    ledger.charge("weights", 60)
    with pytest.raises(DeviceOutOfMemory):
        ledger.charge("kv", 41)
    assert ledger.used == 60  # nothing charged by the refused call
    ledger.charge("weights", 90)  # replaces
    assert ledger.used == 90
    with ledger.scope():
        ledger.charge("kv", 10)
        assert ledger.room() == 0
    assert ledger.used == 90


def test_curve_measures_then_extrapolates() -> None:
    calls = []

    def measure(x: int) -> int:
        calls.append(x)
        if x == 3:
            raise MemoryError
        return 100 + 10 * x

    c = Curve("c", measure, max_measured=4)
    assert c(1) == 110 and c(2) == 120 and c(4) == 140
    assert c(3) == math.inf  # ran out of memory: recorded, not raised
    assert c(100) == pytest.approx(1100)
    assert c.source(100) == "extrapolated" and c.source(2) == "measured"
    assert c.slope() == pytest.approx(10)
    assert calls == [1, 2, 4, 3]


def test_is_oom() -> None:
    assert is_oom(MemoryError())
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(OSError("mmap failed: Cannot allocate memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))
