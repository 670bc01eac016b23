# SPDX-License-Identifier: Apache-2.0
"""LLaVA (``LlavaForConditionalGeneration``): CLIP-like vision tower + MLP projector + Llama.

Image tokens per image follow ``LlavaProcessor``: ``(H // patch) * (W // patch)`` plus the
tower's extra tokens (1 CLS for CLIP), minus 1 when ``vision_feature_select_strategy`` is
"default" (the CLS row is dropped). Every image is resized / cropped to the tower's size, so
all images of a model give the same count (576 for LLaVA-1.5 at 336 px, patch 14).
"""

from __future__ import annotations

import json

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, PreTrainedModel

from epdrt.models.base import Extras, ModelAdapter
from epdrt.models.errors import ModelLoadError

# Vision towers with one extra (CLS) token in front of the patch tokens.
_CLS_TOWERS = frozenset({"clip_vision_model"})


class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    encoder_parts = ("model.vision_tower", "model.multi_modal_projector")
    legacy_prefixes = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )

    @classmethod
    def model_class(cls) -> type[PreTrainedModel]:
        return LlavaForConditionalGeneration

    def _setup_tokens(self) -> None:
        c = self.config
        token_id = getattr(c, "image_token_id", None)
        if token_id is None:
            token_id = c.image_token_index
        self.image_token_id = int(token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if not isinstance(self.image_token, str):
            raise ModelLoadError(f"the tokenizer has no token with the image id {token_id}")
        self.image_placeholder = self.image_token
        v = c.vision_config
        self._patch = int(v.patch_size)
        self._extra = 1 if v.model_type in _CLS_TOWERS else 0
        self._drop = 1 if c.vision_feature_select_strategy == "default" else 0

    def _check_processor(self) -> None:
        size = int(self.config.vision_config.image_size)
        probe = Image.new("RGB", (size // 2 + 3, size + 5))  # any shape: output must be square
        shape = tuple(
            self.image_processor(images=[probe], return_tensors="pt")["pixel_values"].shape
        )
        if shape[-2:] != (size, size):
            raise ModelLoadError(
                f"the image processor makes {shape[-2]}x{shape[-1]} images; the vision tower"
                f" takes {size}x{size}"
            )
        path = self.model_dir / "processor_config.json"
        if path.exists():  # optional; when present it must agree with the model
            p = json.loads(path.read_text())
            want = {
                "patch_size": self._patch,
                "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
                "num_additional_image_tokens": self._extra,
            }
            bad = {k: (p[k], v) for k, v in want.items() if k in p and p[k] != v}
            if bad:
                raise ModelLoadError(f"{path} disagrees with the model (processor, model): {bad}")

    def _num_tokens(self, height: int, width: int) -> int:
        return (height // self._patch) * (width // self._patch) + self._extra - self._drop

    def _preprocess(self, img: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        out = self.image_processor(images=[img], return_tensors="pt")
        pixels = out["pixel_values"]  # [1, 3, H, W] float32
        return {"pixel_values": pixels}, self._num_tokens(pixels.shape[-2], pixels.shape[-1])

    def _encode_batch(self, items: list[Extras]) -> list[torch.Tensor]:
        vision = self.model.model.vision_tower
        pixels = torch.cat([t["pixel_values"] for t in items]).to(self.device, vision.dtype)
        out = self.model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return list(feats)
