# SPDX-License-Identifier: Apache-2.0
"""The few places where transformers 5.x versions differ for the stage functions.

- ``transformers.image_transforms.convert_to_rgb`` composites alpha over white and wants
  ``return_numpy=True`` in 5.2x; 5.17 drops alpha and has no such argument.
- ``AutoImageProcessor.from_pretrained(..., backend="pil")`` gives the PIL/numpy processor in
  5.2x; 5.17 ignores ``backend`` and gives the torchvision one, which fails without
  torchvision: ``pil_image_processor`` names the PIL class (``<type>Pil``, in both).
- ``AttentionInterface.register`` and a model's attention layers reading
  ``config._attn_implementation`` at every call are the same in 5.17 and 5.24 (so are the
  keyword arguments they pass on to the attention function).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
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
