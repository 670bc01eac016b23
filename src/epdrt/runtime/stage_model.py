# SPDX-License-Identifier: Apache-2.0
"""The runtime's view of a model: the few calls its roles make, on top of epdrt.models.

``Preprocessor`` (router side, no weights): request -> token ids, image tensors, content keys.
``StageModel`` (worker side, only the weights of its roles): encode, embed, and the LM forward
over a flat batch in the paged KV cache (prefill chunks and decode tokens alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epdrt.cache.sizing import blocks_for
from epdrt.models import load_adapter
from epdrt.models.errors import RequestError as ModelRequestError
from epdrt.models.paged import FlatBatch
from epdrt.models.types import ImageInput, ImageLimits, ModelSpec, PreparedRequest
from epdrt.runtime.config import EPDConfig
from epdrt.runtime.request import Request, RequestError

__all__ = ["FlatBatch", "PreparedImage", "Preprocessor", "StageModel"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PreparedImage:
    """One image of a prepared request: its key, token count, prompt position, encoder inputs."""

    key: bytes
    num_tokens: int
    start: int
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Prepared:
    input_ids: list[int]
    images: list[PreparedImage]
    extras: dict[str, torch.Tensor]


class Preprocessor:
    """Decodes, checks and preprocesses images and tokenizes prompts (the router's part)."""

    def __init__(self, adapter, config: EPDConfig) -> None:
        self.adapter = adapter
        self.spec: ModelSpec = adapter.spec
        self.config = config
        self.limits = ImageLimits(
            max_images=config.max_images_per_request,
            max_bytes=config.max_image_bytes,
            max_pixels=config.max_image_pixels,
        )

    @classmethod
    def load(cls, model_dir: str, config: EPDConfig) -> Preprocessor:
        return cls(load_adapter(model_dir, device="cpu", stages=frozenset()), config)

    @property
    def placeholder(self) -> str:
        return self.spec.image_placeholder

    def prepare(self, request: Request) -> Prepared:
        """Raises RequestError with a clear reason for any bad input."""
        try:
            prepared: PreparedRequest = self.adapter.prepare(
                request.prompt,
                request.images,
                max_new_tokens=request.max_new_tokens,
                limits=self.limits,
            )
        except ModelRequestError as exc:
            raise RequestError(str(exc)) from exc
        self._check_fits(prepared, request.max_new_tokens)
        return Prepared(
            prepared.input_ids,
            [
                PreparedImage(im.content_key, im.num_tokens, start, dict(im.tensors))
                for im, start in zip(prepared.images, prepared.image_starts)
            ],
            dict(prepared.extras),
        )

    def _check_fits(self, prepared: PreparedRequest, max_new_tokens: int) -> None:
        """A request that could never fit a worker's caches fails now instead of waiting
        forever: its distinct images' MM tokens, and its prompt plus output KV."""
        cfg = self.config
        sizes = {im.content_key: im.num_tokens for im in prepared.images}
        mm_blocks = sum(blocks_for(n, cfg.mm_block_size) for n in sizes.values())
        mm_capacity = blocks_for(cfg.mm_cache_tokens, cfg.mm_block_size)
        if mm_blocks > mm_capacity:
            raise RequestError(
                f"the request's images need {sum(sizes.values())} multimodal tokens"
                f" ({mm_blocks} blocks), more than the whole MM-token cache of"
                f" {mm_capacity * cfg.mm_block_size} tokens"
            )
        kv_tokens = prepared.num_tokens + max_new_tokens
        kv_capacity = blocks_for(cfg.kv_cache_tokens, cfg.kv_block_size) * cfg.kv_block_size
        if blocks_for(kv_tokens, cfg.kv_block_size) * cfg.kv_block_size > kv_capacity:
            raise RequestError(
                f"the request needs KV for {kv_tokens} tokens (prompt + max_new_tokens), more"
                f" than the whole KV cache of {kv_capacity} tokens"
            )

    def decode(self, token_ids: list[int]) -> str:
        return self.adapter.detokenize(token_ids)


class StageModel:
    """The model calls of one worker, on its device, with only its roles' weights loaded."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.spec: ModelSpec = adapter.spec
        self.dtype: torch.dtype = adapter.spec.dtype

    @classmethod
    def load(cls, model_dir: str, roles: set[str], device: torch.device, dtype: str) -> StageModel:
        adapter = load_adapter(
            model_dir, device=device, dtype=_DTYPES[dtype], stages=frozenset(roles)
        )
        return cls(adapter)

    @torch.inference_mode()
    def encode(self, items: list[tuple[bytes, int, dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
        """Encoder outputs ``[num_tokens_i, hidden]`` for (key, num_tokens, tensors) items."""
        images = [ImageInput(tensors, n, key, (0, 0)) for key, n, tensors in items]
        return self.adapter.encode(images)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``[n, hidden]`` of ``input_ids [n] int64``."""
        return self.adapter.embed(input_ids)

    @torch.inference_mode()
    def forward(
        self, embeds: torch.Tensor, batch: FlatBatch, extras: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """The LM over a flat batch (``ModelAdapter.forward``): writes the new tokens' K/V into
        ``batch.cache``; returns ``[b, vocab]`` logits of each sequence's last new token."""
        return self.adapter.forward(embeds, batch, extras)

    def decode_extras(self, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What decoding needs of a request, from its prompt's extras (CPU tensors)."""
        return self.adapter.decode_extras(extras)
