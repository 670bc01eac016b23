# SPDX-License-Identifier: Apache-2.0
"""Adapters by config ``model_type``, and ``load_adapter``."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epdrt.models.errors import ModelLoadError
from epdrt.models.types import STAGES, ImageLimits

if TYPE_CHECKING:
    from epdrt.models.base import ModelAdapter

# model_type -> adapter class, or "module:Class" imported on first use (keeps imports light).
_REGISTRY: dict[str, type[ModelAdapter] | str] = {
    "llava": "epdrt.models.llava:LlavaAdapter",
    "qwen2_vl": "epdrt.models.qwen2_vl:Qwen2VLAdapter",
}


def register_adapter(
    model_type: str, adapter: type[ModelAdapter] | str, *, replace: bool = False
) -> None:
    """Registers ``adapter`` (a ModelAdapter subclass or "module:Class") for ``model_type``."""
    if model_type in _REGISTRY and not replace:
        raise ValueError(f"an adapter for {model_type!r} is registered; pass replace=True")
    _REGISTRY[model_type] = adapter


def registered_model_types() -> list[str]:
    """The config ``model_type`` values with an adapter."""
    return sorted(_REGISTRY)


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class for ``model_type``."""
    try:
        entry = _REGISTRY[model_type]
    except KeyError:
        raise ModelLoadError(
            f"no adapter for model type {model_type!r} (known: {registered_model_types()})"
        ) from None
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        _REGISTRY[model_type] = entry
    return entry


def read_model_type(model_dir: str | Path) -> str:
    """``model_type`` from ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    try:
        return str(json.loads(path.read_text())["model_type"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read model_type from {path}: {exc}") from exc


def load_adapter(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    stages: Sequence[str] | frozenset[str] = STAGES,
    limits: ImageLimits | None = None,
    max_context: int | None = None,
) -> ModelAdapter:
    """Loads the adapter for the model in ``model_dir`` (see ``ModelAdapter`` for arguments).

    Memory: "encode" holds the vision tower and projector; "prefill" / "decode" hold the
    language model, its embeddings and ``lm_head``; ``stages=()`` holds no weights.
    """
    cls = adapter_class(read_model_type(model_dir))
    return cls(
        model_dir, device=device, dtype=dtype, stages=stages, limits=limits, max_context=max_context
    )
