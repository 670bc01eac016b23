# SPDX-License-Identifier: Apache-2.0
"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): dynamic-resolution ViT + Qwen2 with M-RoPE.

An image is resized to a multiple of ``patch * merge`` pixels within ``[min_pixels,
max_pixels]`` and gives ``t * h * w / merge**2`` tokens, ``(t, h, w)`` its patch grid
(``Qwen2VLProcessor``'s rule). A prompt carries ``<|vision_start|><|image_pad|><|vision_end|>``
per image; the ``<|image_pad|>`` is repeated.

Positions: M-RoPE ``position_ids [3, n]`` (temporal, height, width) come from the model's own
``get_rope_index`` per request, and decode positions are ``past_len + rope_delta``.
HF keeps ``rope_deltas`` as state on the model; here it travels with each request instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel, Qwen2VLForConditionalGeneration

from epdrt.models.base import Extras, ModelAdapter
from epdrt.models.errors import ModelLoadError, RequestError
from epdrt.models.types import ImageInput


class Qwen2VLAdapter(ModelAdapter):
    model_type = "qwen2_vl"
    encoder_parts = ("model.visual",)
    legacy_prefixes = (
        ("visual.", "model.visual."),
        ("model.", "model.language_model."),
    )

    @classmethod
    def model_class(cls) -> type[PreTrainedModel]:
        return Qwen2VLForConditionalGeneration

    def _setup_tokens(self) -> None:
        c, tok = self.config, self.tokenizer
        self.image_token_id = int(c.image_token_id)
        names = tok.convert_ids_to_tokens(
            [int(c.vision_start_token_id), self.image_token_id, int(c.vision_end_token_id)]
        )
        if not all(isinstance(n, str) for n in names):
            raise ModelLoadError("the tokenizer lacks the vision start / image / end tokens")
        self.image_token = names[1]
        self.image_placeholder = "".join(names)
        self._video_token = tok.convert_ids_to_tokens(int(c.video_token_id))
        self._merge = int(c.vision_config.spatial_merge_size)

    def _check_processor(self) -> None:
        v, p = self.config.vision_config, self.image_processor
        want = {
            "patch_size": v.patch_size,
            "merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        }
        bad = {k: (getattr(p, k, None), w) for k, w in want.items() if getattr(p, k, None) != w}
        if bad:
            raise ModelLoadError(
                f"the image processor disagrees with the model (processor, model): {bad}"
            )

    def _check_prompt(self, prompt: str) -> None:
        if isinstance(self._video_token, str) and self._video_token in prompt:
            raise RequestError(f"videos ({self._video_token!r}) are not supported")

    def _preprocess(self, img: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        out = self.image_processor(images=[img], return_tensors="pt")
        grid = out["image_grid_thw"].to(torch.int64)  # [1, 3]
        pixels = out["pixel_values"]  # [num_patches, 3 * temporal_patch * patch * patch]
        return {"pixel_values": pixels, "image_grid_thw": grid}, int(grid.prod()) // self._merge**2

    def _encode_batch(self, items: list[Extras]) -> list[torch.Tensor]:
        visual = self.model.model.visual
        pixels = torch.cat([t["pixel_values"] for t in items]).to(self.device, visual.dtype)
        grid = torch.cat([t["image_grid_thw"] for t in items]).to(self.device)
        out = self.model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return list(feats)

    def _request_extras(
        self, input_ids: list[int], images: list[ImageInput] | tuple[ImageInput, ...]
    ) -> dict[str, torch.Tensor]:
        ids = torch.tensor([input_ids], dtype=torch.long)
        n = ids.shape[1]
        if not images:
            return {
                "position_ids": torch.arange(n).expand(3, n).contiguous(),
                "rope_delta": torch.zeros(1, dtype=torch.long),
            }
        grid = torch.cat([im.tensors["image_grid_thw"] for im in images])
        mm_types = (ids == self.image_token_id).to(torch.int32)  # 1 = image token
        # get_rope_index reads only the config: it runs on the meta skeleton without weights.
        position_ids, delta = self.model.model.get_rope_index(
            ids, mm_token_type_ids=mm_types, image_grid_thw=grid
        )
        return {
            "position_ids": position_ids[:, 0].to(torch.long).contiguous(),  # [3, n]
            "rope_delta": delta.reshape(1).to(torch.long),
        }

    def _flat_positions(
        self, extras: Sequence[Extras], starts: np.ndarray, counts: np.ndarray
    ) -> torch.Tensor:
        """``[3, 1, T]``: a prompt's tokens take their M-RoPE positions from the prompt's
        ``position_ids [3, n]``; later tokens (decode, or generated tokens prefilled again
        after a preemption) sit at ``position + rope_delta`` on all three axes, as in
        ``generate()``."""
        text = self._text_positions(starts, counts) + np.repeat(
            np.array([_delta(x) for x in extras], dtype=np.int64), counts
        )
        pos = torch.from_numpy(text).expand(3, -1).clone()
        first = 0
        for x, start, count in zip(extras, starts.tolist(), counts.tolist()):
            prompt = x.get("position_ids")
            if prompt is not None:
                if prompt.dim() != 2 or prompt.shape[0] != 3:
                    raise ValueError(f"position_ids must be [3, n], got {list(prompt.shape)}")
                covered = max(0, min(count, prompt.shape[1] - start))
                pos[:, first : first + covered] = prompt[:, start : start + covered]
            first += count
        return pos[:, None].to(self.device)

    def decode_extras(self, extras: Extras) -> dict[str, torch.Tensor]:
        return {"rope_delta": torch.tensor([_delta(extras)], dtype=torch.long)}


def _delta(extras: Extras) -> int:
    delta = extras.get("rope_delta")
    return 0 if delta is None else int(delta.reshape(-1)[0])
