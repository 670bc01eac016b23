# SPDX-License-Identifier: Apache-2.0
"""Hand-offs on a GPU are ordered after the work that produced them.

The transfer engine copies on CUDA streams of its own: a copy of an image's tokens must start
after the vision tower (on torch's stream) wrote them, and a decoder in another process may
pull a sequence's KV only once the prefill's staging writes are done. These CPU tests check
that the ordering calls are made, through fake streams; tests/test_pipeline.py's verified
cluster on ``cuda:0`` checks the bytes themselves on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from role_fakes import FakeModel

from epdrt import device as device_mod
from epdrt.cache import MMTokenCache, PagedKVCache
from epdrt.runtime import messages as m
from epdrt.runtime.integrity import content_digest
from epdrt.runtime.prefill_role import PrefillRole
from epdrt.runtime.worker import Worker


class FakeStream:
    """Stands in for ``torch.cuda.Stream``: a raw handle and a logged synchronize."""

    def __init__(self, handle: int, log: list) -> None:
        self.cuda_stream, self.log = handle, log

    def synchronize(self) -> None:
        self.log.append("synchronize")


@pytest.fixture
def fake_cuda_stream(monkeypatch):
    """torch.cuda.current_stream() returns a FakeStream (handle 0xC0FFEE); the log of calls."""
    log: list = []
    stream = FakeStream(0xC0FFEE, log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    return log


def test_producer_stream_is_torchs_current_stream_on_cuda(fake_cuda_stream):
    assert device_mod.producer_stream(torch.device("cuda", 0)) == 0xC0FFEE
    assert device_mod.producer_stream(torch.device("cpu")) is None


def test_wait_for_producer_synchronizes_only_on_cuda(fake_cuda_stream):
    device_mod.wait_for_producer(torch.device("cpu"))
    assert fake_cuda_stream == []
    device_mod.wait_for_producer(torch.device("cuda", 0))
    assert fake_cuda_stream == ["synchronize"]


class RecordingEngine:
    """Logs each submit_blocks call's arguments instead of copying."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def submit_blocks(self, src, dst, src_offsets, dst_offsets, nbytes, **kwargs):
        self.calls.append(dict(src_offsets=src_offsets, dst_offsets=dst_offsets, **kwargs))
        return SimpleNamespace(done=lambda: False, path="host-threads")


@pytest.mark.parametrize("dev", ["cpu", "cuda:0"])
def test_copy_blocks_waits_for_the_producer_stream(dev, fake_cuda_stream):
    w = Worker.__new__(Worker)
    w.device, w.engine, w.outbox, w.counters = torch.device(dev), RecordingEngine(), [], {}
    w.copy_blocks("src", "dst", [3, 1], [0, 7], 256, lambda error: None, ("kv", "p0", "d0"))
    (call,) = w.engine.calls
    assert call["after_stream"] == (0xC0FFEE if dev.startswith("cuda") else None)
    assert np.array_equal(call["src_offsets"], [768, 256])
    assert np.array_equal(call["dst_offsets"], [0, 1792])
    assert len(w.outbox) == 1
    assert w.counters == {"link_bytes/kv/p0/d0": 512.0, "link_copies/kv/p0/d0/host-threads": 1}


def test_prefill_finishes_its_staging_writes_before_telling_decoders(monkeypatch):
    """Every KVReady of a batch is sent after one wait for the prefill's stream, and after the
    staged KV is in the cache."""
    log: list = []
    kv = PagedKVCache(2, 2, 8, 4, 16, torch.float32)
    w = SimpleNamespace(
        name="p0", device=torch.device("cpu"), decode=None, encode=None,
        mm=MMTokenCache(16, 4, 8, torch.float32), kv=kv,
        model=FakeModel(hidden=16),
        config=SimpleNamespace(prefill_max_batch_tokens=4096, verify_transfers=False,
                              kv_handoff="pull"),
        count=lambda *a: None, digest=lambda t: None,
        send=lambda peer, msg, frames=None: log.append((peer, type(msg).__name__)),
    )  # fmt: skip
    monkeypatch.setattr(
        "epdrt.runtime.prefill_role.wait_for_producer", lambda dev: log.append("wait")
    )
    role = PrefillRole(w)
    for i, n in enumerate((5, 9)):
        req = m.PrefillRequest(f"r{i}", list(range(n)), [], 4, "d0", [])
        role.handle(req, [])
    assert role.step()
    assert log == [
        ("cluster", "Tokens"), ("cluster", "Tokens"), "wait", ("d0", "KVReady"), ("d0", "KVReady"),
    ]  # fmt: skip
    assert sorted(kv.sequences()) == ["r0", "r1"]  # staged until the decoders pull


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_content_digest_sees_changed_and_swapped_bytes(dtype):
    t = torch.randn(6, 5).to(dtype)
    digest = int(content_digest(t))
    assert int(content_digest(t.clone())) == digest
    assert int(content_digest(t.flip(0))) != digest  # the same words in another order
    bumped = t.clone()
    bumped.view(torch.int16).view(-1)[7] += 1  # one bit of one element
    assert int(content_digest(bumped)) != digest


def test_a_digest_mismatch_is_explained_and_counted():
    w = Worker.__new__(Worker)
    w.counters = {}
    t = torch.randn(3, 4)
    sent = int(content_digest(t))
    assert w.digest_mismatch(sent, t.clone()) is None
    assert "differ from those sent" in w.digest_mismatch(sent, t.flip(1))
    assert w.digest_mismatch(None, t.flip(1)) is None  # the sender did not digest
    assert w.counters == {"transfer_digest_checks": 2, "transfer_digest_mismatches": 1}
