# SPDX-License-Identifier: Apache-2.0
"""What this epdrt build and host offer: version, build options, devices."""

from __future__ import annotations

import platform
from typing import Any

import torch

from epdrt import _core


def build_info() -> dict[str, Any]:
    """A JSON-friendly summary of the build and the devices visible to it."""
    cuda_devices = _core.cuda_device_count()
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "memory_bytes": props.total_memory})
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "version": _core.__version__,
        "cuda_compiled": bool(_core.cuda_compiled),
        "cuda_devices_core": cuda_devices,
        "cuda_available_torch": torch.cuda.is_available(),
        "devices": devices,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
