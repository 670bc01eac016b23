# SPDX-License-Identifier: Apache-2.0
"""The few places where transformers 5.x versions differ for the stage functions.

- The language model's cache keyword is ``cache=`` from 5.2x on (``past_key_values=`` is
  deprecated there) and ``past_key_values=`` before (5.17 ignores an unknown ``cache=``
  silently, so the keyword must be picked, not guessed).
- ``transformers.image_transforms.convert_to_rgb`` composites alpha over white and wants
  ``return_numpy=True`` in 5.2x; 5.17 drops alpha and has no such argument.
- ``AutoImageProcessor.from_pretrained(..., backend="pil")`` gives the PIL/numpy processor in
  5.2x; 5.17 ignores ``backend`` and gives the torchvision one, which fails without
  torchvision: ``pil_image_processor`` names the PIL class (``<type>Pil``, in both).
- ``DynamicCache(config=text_config)`` and ``cache.layers[i].keys/values``
  (``[batch, kv_heads, seq, head_dim]``) are the same in 5.17 and 5.24.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import DynamicCache, PreTrainedConfig
from transformers.image_transforms import convert_to_rgb as _hf_convert_to_rgb

_RGB_RETURNS_NUMPY = "return_numpy" in inspect.signature(_hf_convert_to_rgb).parameters


def convert_to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an RGB image, converted the way the installed HF image processors do."""
    if _RGB_RETURNS_NUMPY:
        return Image.fromarray(np.asarray(_hf_convert_to_rgb(img, return_numpy=True)))
    return _hf_convert_to_rgb(img)


def pil_image_processor(model_dir: Path):
    """The model directory's image processor, in its PIL/numpy form (no torchvision needed).

    Raises OSError when ``preprocessor_config.json`` cannot be read, KeyError when it names
    no processor type, ValueError when transformers has no such class.
    """
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    name = config["image_processor_type"]
    base = name.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, f"{base}Pil", None) or getattr(transformers, base, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no image processor {name}")
    return cls.from_pretrained(model_dir, local_files_only=True)


def cache_kwarg(module: nn.Module) -> str:
    """Name of the KV-cache keyword of ``module.forward`` (``cache`` or ``past_key_values``)."""
    params = inspect.signature(module.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(module).__name__}.forward takes neither cache= nor past_key_values=")


def new_cache(text_config: PreTrainedConfig) -> DynamicCache:
    """An empty dynamic KV cache laid out for ``text_config``."""
    return DynamicCache(config=text_config)


def cache_from_tensors(
    text_config: PreTrainedConfig, keys: list[torch.Tensor], values: list[torch.Tensor]
) -> DynamicCache:
    """A cache holding ``keys[i]``/``values[i]`` ``[batch, kv_heads, seq, head_dim]`` per layer."""
    cache = new_cache(text_config)
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer, each ``[batch, kv_heads, seq, head_dim]``."""
    entry = cache.layers[layer]
    return entry.keys, entry.values
