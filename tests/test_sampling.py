# SPDX-License-Identifier: Apache-2.0
"""Sampling: the transforms equal transformers' own logits processors, greedy stays argmax,
seeded draws depend on (seed, token index) only, and through a cluster a seeded request gives
the same tokens in every mode; stop tokens end a request."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from epdrt.errors import InvalidArgument
from epdrt.runtime import EPDCluster, EPDConfig, Request, RequestError
from epdrt.runtime.sampling import SamplingParams, process_logits, sample

VOCAB = 257
IGNORE_EOS = SamplingParams(ignore_eos=True)  # greedy, to max_new_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 1.0), (1.0, 0, 0.9), (0.5, 50, 0.8), (2.0, 1, 0.5),
     (1.0, 0, 0.01)],
)  # fmt: skip
def test_transforms_equal_transformers_logits_processors(temperature, top_k, top_p, dtype):
    logits = (torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    want = TemperatureLogitsWarper(temperature)(None, logits.float()[None])
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = process_logits(logits, params)
    assert torch.equal(torch.isinf(got), torch.isinf(want[0]))
    torch.testing.assert_close(got, want[0], rtol=0, atol=0)


def test_greedy_is_argmax_and_seeded_draws_repeat():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    assert sample(logits, SamplingParams(), 5) == int(torch.argmax(logits))
    hot = SamplingParams(temperature=1.5, seed=42)
    draws = [sample(logits, hot, i) for i in range(64)]
    assert draws == [sample(logits, hot, i) for i in range(64)]  # same seed, same index
    assert len(set(draws)) > 10  # a flat enough softmax: the draws differ by index
    other = [sample(logits, SamplingParams(temperature=1.5, seed=43), i) for i in range(64)]
    assert other != draws
    # top_k=1 leaves one token: the argmax, whatever the temperature.
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1, seed=7), 0) == int(
        torch.argmax(logits)
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(seed=-1),
     dict(stop_token_ids=["x"]), dict(top_k=True)],
)  # fmt: skip
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(InvalidArgument):
        SamplingParams(**kwargs)


def test_stop_tokens_and_ignore_eos():
    p = SamplingParams(stop_token_ids=[9])
    assert p.finishes(9, [2]) and p.finishes(2, [2]) and not p.finishes(3, [2])
    assert not SamplingParams(ignore_eos=True).finishes(2, [2])


def test_seeded_sampling_gives_the_same_tokens_in_every_mode(tiny_model_dir):
    model = tiny_model_dir("llava")
    hot = SamplingParams(temperature=1.5, top_p=0.95, seed=1234, ignore_eos=True)
    tokens = {}
    for mode in ("epd", "aggregated"):
        with EPDCluster.launch(model, EPDConfig(mode=mode, request_timeout_s=120)) as cluster:
            seeded, greedy, unseeded = cluster.generate([
                Request("sample these words", [], 12, sampling=hot),
                Request("sample these words", [], 12),
                Request("sample these words", [], 12, sampling=SamplingParams(temperature=1.5)),
            ])  # fmt: skip
        assert seeded.error is None and len(seeded.token_ids) == 12
        assert unseeded.error is None and len(unseeded.token_ids) >= 1
        tokens[mode] = (seeded.token_ids, greedy.token_ids)
    assert tokens["epd"] == tokens["aggregated"]
    assert tokens["epd"][0] != tokens["epd"][1]  # sampling did not fall back to greedy
    # A stop token ends the request with it: stop at the first token not seen before it.
    greedy_tokens = tokens["epd"][1]
    j = next(i for i, t in enumerate(greedy_tokens) if i > 0 and t not in greedy_tokens[:i])
    stop = SamplingParams(stop_token_ids=[greedy_tokens[j]])
    with EPDCluster.launch(model, EPDConfig(mode="pd", request_timeout_s=120)) as cluster:
        (stopped,) = cluster.generate([Request("sample these words", [], 12, sampling=stop)])
    assert stopped.token_ids == greedy_tokens[: j + 1]


def test_a_stop_string_ends_the_request_and_frees_it(tiny_model_dir):
    model = tiny_model_dir("llava")
    with EPDCluster.launch(model, EPDConfig(mode="epd", request_timeout_s=120)) as cluster:
        (full,) = cluster.generate([Request("stop somewhere", [], 16, sampling=IGNORE_EOS)])
        words = full.text.split()
        assert len(words) >= 4, full.text
        stop = words[2]
        (cut,) = cluster.generate(
            [Request("stop somewhere", [], 16, sampling=IGNORE_EOS, stop=[stop, "never seen"])]
        )
    assert cut.error is None
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 16
    in_use = [v for s in cluster.worker_stats().values() for k, v in s.items() if "in_use" in k]
    assert in_use and set(in_use) == {0.0}  # the workers were told to drop it


@pytest.mark.parametrize("stop", ["a string", ["ok", ""], [3]])
def test_bad_stop_strings_are_rejected(stop):
    with pytest.raises(RequestError):
        Request("x", [], 4, stop=stop)
