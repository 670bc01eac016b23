# SPDX-License-Identifier: Apache-2.0
"""Plain data passed between the router and the encode / prefill / decode stages.

Every tensor here is a ``torch.Tensor`` that can travel as a named frame: the runtime may ship
``ImageInput.tensors`` to an encoder, ``PreparedRequest.extras`` to a prefill worker and
``ModelAdapter.decode_extras`` to a decode worker without knowing what is inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: The stages a process may load (``load_adapter(..., stages=...)``).
STAGES = frozenset({"encode", "prefill", "decode"})


@dataclass(frozen=True)
class ImageLimits:
    """Admission limits for one request's images (checked by the router, before any model work).

    Attributes:
        max_images: most images in one request.
        max_bytes: most encoded bytes of one image (file or buffer).
        max_pixels: most decoded pixels (width * height) of one image, checked from the header
            before the pixels are decoded (guards against decompression bombs).
        formats: accepted container formats, as PIL names them ("PNG", "JPEG", ...).
    """

    max_images: int = 8
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime sizes its caches and sockets from.

    Attributes:
        model_type: config ``model_type`` ("llava", "qwen2_vl").
        num_layers: decoder layers of the language model.
        num_heads: attention (query) heads.
        num_kv_heads: K/V heads (KV cache dim 3).
        head_dim: K/V head size (KV cache dim 4).
        hidden_size: language-model hidden size; width of text embeddings and of image tokens.
        vocab_size: rows of the logits.
        dtype: dtype of the weights, of the KV and of the image tokens.
        eos_token_ids: token ids that end generation (config and generation config merged).
        max_context: most tokens of prompt plus generated tokens.
        image_token_id: id of the image placeholder token repeated once per image token.
        image_placeholder: what a prompt carries once per image ("<image>", or
            "<|vision_start|><|image_pad|><|vision_end|>").
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    max_context: int
    image_token_id: int
    image_placeholder: str

    @property
    def eos_token_id(self) -> int:
        """The first end-of-sequence id."""
        return self.eos_token_ids[0]

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image, ready for ``encode``.

    Attributes:
        tensors: the encoder's inputs, on CPU. LLaVA: ``pixel_values [1, 3, H, W] float32``.
            Qwen2-VL: ``pixel_values [num_patches, 3 * temporal_patch * patch * patch] float32``
            and ``image_grid_thw [1, 3] int64`` (grid in patches before merging).
        num_tokens: rows of this image's encoder output (= its placeholder tokens in the prompt).
        content_key: 32-byte BLAKE2b digest of the model identity, the preprocessing settings and
            the decoded RGB pixels: equal images give equal keys across path / bytes / PIL input.
        size: ``(width, height)`` of the decoded image in pixels.
    """

    tensors: dict[str, torch.Tensor]
    num_tokens: int
    content_key: bytes
    size: tuple[int, int]

    @property
    def key(self) -> bytes:
        """Alias of ``content_key``."""
        return self.content_key


@dataclass(eq=False)
class PreparedRequest:
    """A tokenized request: placeholders expanded, image token spans known.

    Attributes:
        input_ids: prompt token ids, each image's placeholder expanded to its ``num_tokens``
            copies of ``spec.image_token_id`` (exactly what the model's HF processor produces).
        images: the request's images in prompt order.
        image_starts: index in ``input_ids`` of each image's first token; image ``i`` occupies
            ``input_ids[image_starts[i] : image_starts[i] + images[i].num_tokens]``.
        extras: model-specific tensors that ``prefill`` needs, on CPU. LLaVA: none. Qwen2-VL:
            ``position_ids [3, n] int64`` (M-RoPE) and ``rope_delta [1] int64``.
    """

    input_ids: list[int]
    images: list[ImageInput]
    image_starts: list[int]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def image_spans(self) -> list[tuple[int, int]]:
        """``(start, num_tokens)`` of each image in prompt order."""
        return [(s, im.num_tokens) for s, im in zip(self.image_starts, self.images)]
