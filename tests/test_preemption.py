# SPDX-License-Identifier: Apache-2.0
"""Decode admission by growth: the running set bounded by ``max_num_seqs``, blocks allocated as
sequences grow, and preemption (recompute) when the KV cache is full: the newest sequence is
evicted, prefilled again with what it generated, and every request still gets the tokens of
``generate()`` (greedy) or of a roomy run (seeded sampling)."""

from __future__ import annotations

import pytest
import torch
from model_utils import make_image, reference_tokens
from role_fakes import KV_BLOCK, FakeWorker

from epdrt.models import load_adapter
from epdrt.runtime import EPDCluster, EPDConfig, Request
from epdrt.runtime import messages as m
from epdrt.runtime.sampling import GREEDY, SamplingParams

TIMEOUT_S = 120.0


def run_locally(d0: FakeWorker, req_id: str, prompt_tokens: int, max_new: int) -> None:
    """A sequence prefilled in d0 (its prompt's KV in d0's cache), handed to its decode role."""
    d0.kv.extend(req_id, prompt_tokens)
    d0.decode.start_local(req_id, 3, max_new, {})


def test_the_running_set_is_bounded_by_max_num_seqs():
    d0 = FakeWorker("d0", {"decode"}, kv_blocks=32, max_num_seqs=2)
    for req_id, max_new in (("a", 2), ("b", 5), ("c", 5)):
        run_locally(d0, req_id, 4, max_new)
    d0.decode.step()  # a and b run; a ends with its second token
    assert list(d0.decode.active) == ["b"] and "a" not in d0.kv
    assert [x[0] for x in d0.decode.local_queue] == ["c"]  # c waited for a slot
    assert d0.counters["decode_seq_limit_waits"] >= 1
    d0.decode.step()
    assert list(d0.decode.active) == ["b", "c"] and not d0.decode.local_queue


def test_a_full_cache_preempts_the_newest_sequence_and_frees_its_blocks():
    # 3 blocks of 4 tokens: a and b hold one each (4-token prompts); their 5th tokens need a
    # block each, and only one is free.
    d0 = FakeWorker("d0", {"decode"}, kv_blocks=3)
    run_locally(d0, "a", KV_BLOCK, 10)
    run_locally(d0, "b", KV_BLOCK, 10)
    d0.decode.step()
    (preempted,) = d0.take("cluster", m.Preempted)
    assert preempted == m.Preempted("b", 1)  # after its first token (prefill's)
    assert "b" not in d0.kv and list(d0.decode.active) == ["a"]
    assert d0.kv.seq_len("a") == KV_BLOCK + 1 and d0.counters["decode_preemptions"] == 1
    (tokens,) = d0.take("cluster", m.Tokens)
    assert [e.req_id for e in tokens.events] == ["a"]  # b's step was not run
    for _ in range(3):  # a grows within its second block: nothing more is preempted
        d0.decode.step()
    assert not d0.take("cluster", m.Preempted) and d0.kv.seq_len("a") == KV_BLOCK + 4


def test_a_sequence_resumed_after_preemption_continues_its_indices():
    d0 = FakeWorker("d0", {"decode"}, kv_blocks=8)
    d0.kv.extend("r", 6)
    d0.decode.start_local("r", 3, 6, {}, first_index=3)  # tokens 0..2 came before
    d0.decode.step()
    d0.decode.step()
    events = [e for msg in d0.take("cluster", m.Tokens) for e in msg.events]
    assert [(e.index, e.finished) for e in events] == [(4, False), (5, True)]
    assert "r" not in d0.kv


def _requests(ph: str, sampling: SamplingParams | None = None) -> list[Request]:
    """8 requests whose prompts and outputs together need far more KV than a 96-token cache."""
    out = []
    for i in range(8):
        images = [make_image(40, 30, 700 + i)] if i % 2 else []
        prompt = f"USER: {ph} item {i} ASSISTANT:" if images else f"tell me about {i} " * 3
        out.append(Request(prompt, images, 24, id=f"r{i}", sampling=sampling or GREEDY))
    return out


def _tight(mode: str) -> EPDConfig:
    return EPDConfig(
        mode=mode, kv_block_size=4, kv_cache_tokens=96, decode_max_batch=8,
        request_timeout_s=TIMEOUT_S,
    )  # fmt: skip


@pytest.mark.parametrize(("model", "mode"), [("llava", "aggregated"), ("llava", "epd"),
                                             ("qwen2-vl", "pd")])  # fmt: skip
def test_preempted_requests_give_the_tokens_of_generate(tiny_model_dir, model, mode):
    path = tiny_model_dir(model)
    adapter = load_adapter(path)
    requests = _requests(adapter.spec.image_placeholder)
    prepared = [adapter.prepare(r.prompt, r.images) for r in requests]
    expected = [reference_tokens(adapter, [p], 24)[0] for p in prepared]
    with EPDCluster.launch(path, _tight(mode)) as cluster:
        results = cluster.generate(requests)
        preempted = cluster.messages_received().get("Preempted", 0)
    stats = cluster.worker_stats()
    for r, want in zip(results, expected):
        assert r.error is None, r.error
        assert r.token_ids == want, r.id
    assert preempted > 0
    assert sum(s.get("decode_preemptions", 0) for s in stats.values()) == preempted
    in_use = [v for s in stats.values() for k, v in s.items() if k == "kv_blocks_in_use"]
    assert in_use and set(in_use) == {0.0}


def test_a_seeded_request_samples_the_same_tokens_when_preempted(tiny_model_dir):
    path = tiny_model_dir("llava")
    adapter = load_adapter(path)
    sampling = SamplingParams(temperature=0.9, top_k=20, seed=11, ignore_eos=True)
    roomy = EPDConfig(mode="epd", kv_block_size=4, request_timeout_s=TIMEOUT_S)
    with EPDCluster.launch(path, roomy) as cluster:
        alone = cluster.generate(_requests(adapter.spec.image_placeholder, sampling))
    with EPDCluster.launch(path, _tight("epd")) as cluster:
        crowded = cluster.generate(_requests(adapter.spec.image_placeholder, sampling))
        assert cluster.messages_received().get("Preempted", 0) > 0
    for a, b in zip(alone, crowded):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert len(a.token_ids) == 24 and a.token_ids == b.token_ids, a.id
    assert len({tuple(r.token_ids) for r in alone}) > 1
    assert torch.tensor([len(r.token_ids) for r in crowded]).eq(24).all()
