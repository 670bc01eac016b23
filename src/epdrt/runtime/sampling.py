# SPDX-License-Identifier: Apache-2.0
"""Per-request sampling: temperature, top-k, top-p, seed, stop tokens.

Greedy (``temperature == 0``, the default) is ``argmax`` of the logits, bit for bit what
``generate()`` does. Otherwise the logits go through the same transforms, in the same order,
as ``transformers``' logits processors in ``generate()`` (temperature, then top-k, then
top-p), and one token is drawn from the softmax. The draw for a request's ``index``-th token
uses a generator seeded by the request's seed and that index alone, so a seeded request gives
the same tokens in every mode, batch and run.
"""

from __future__ import annotations

import msgspec
import torch

from epdrt.errors import InvalidArgument

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the 63-bit seed space


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a request picks its tokens.

    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1.0 are off. ``seed`` fixes the
    draws (the router picks one when it is None and sampling is on). ``stop_token_ids`` end the
    request like an EOS token (the stop token is the last one returned); ``ignore_eos`` keeps
    going past the model's EOS tokens up to ``max_new_tokens``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        number = (int, float)
        if not isinstance(self.temperature, number) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, number) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be a non-negative int, got {self.top_k!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0
        ):
            raise InvalidArgument(f"seed must be a non-negative int, got {self.seed!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be ints, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def finishes(self, token: int, eos_token_ids: list[int] | tuple[int, ...]) -> bool:
        """Whether ``token`` ends the request (max_new_tokens aside)."""
        return token in self.stop_token_ids or (not self.ignore_eos and token in eos_token_ids)


GREEDY = SamplingParams()


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits [V]`` (any float dtype) as fp32 scores after temperature, top-k and top-p,
    filtered entries ``-inf``; as ``transformers``' warpers compute them (keeping at least
    one token)."""
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """The request's ``index``-th token (0: the first, from prefill) from ``logits [V]``."""
    if params.greedy:
        return int(torch.argmax(logits))
    if params.seed is None:
        raise InvalidArgument("sampling needs a seed (the router assigns one)")
    probs = process_logits(logits, params).softmax(dim=-1).cpu()
    generator = torch.Generator().manual_seed((params.seed * _SEED_MIX + index) % (1 << 63))
    return int(torch.multinomial(probs, 1, generator=generator))
