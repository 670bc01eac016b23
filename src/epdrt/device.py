# SPDX-License-Identifier: Apache-2.0
"""Device specifications: parse what users write ("cpu", "cuda:1", torch.device, int)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epdrt import _core
from epdrt.errors import CudaUnavailable, InvalidArgument

DeviceLike = "str | int | torch.device | Device"

CPU_TYPE = 0
CUDA_TYPE = 1


@dataclass(frozen=True)
class Device:
    """A device as the C++ core sees it: ``type`` 0 (CPU) or 1 (CUDA), and a CUDA ordinal."""

    type: int
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.type == CUDA_TYPE

    @property
    def torch(self) -> torch.device:
        return torch.device("cuda", self.index) if self.is_cuda else torch.device("cpu")

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


def as_device(device: str | int | torch.device | Device) -> Device:
    """Parses a device; an int means that CUDA ordinal. Raises InvalidArgument if unknown."""
    if isinstance(device, Device):
        return device
    if isinstance(device, bool):
        raise InvalidArgument(f"not a device: {device!r}")
    if isinstance(device, int):
        return Device(CUDA_TYPE, device)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"not a device: {device!r}") from exc
    if parsed.type == "cpu":
        return Device(CPU_TYPE, 0)
    if parsed.type == "cuda":
        return Device(CUDA_TYPE, parsed.index if parsed.index is not None else 0)
    raise InvalidArgument(f"unsupported device type {parsed.type!r}: use 'cpu' or 'cuda[:N]'")


def require_cuda(device: Device) -> None:
    """Raises CudaUnavailable unless ``device`` can be used by both epdrt and torch."""
    if not device.is_cuda:
        return
    if not _core.cuda_compiled:
        raise CudaUnavailable("epdrt was built without CUDA (rebuild with EPDRT_CUDA=ON)")
    if not torch.cuda.is_available():
        raise CudaUnavailable("torch sees no CUDA device on this host")


def producer_stream(device: torch.device) -> int | None:
    """The raw ``cudaStream_t`` of torch's current stream on ``device``, as an int (None on the
    CPU, where torch's writes are done when the call that made them returns).

    A transfer of memory that torch just wrote passes it as ``after_stream``: the transfer
    engine copies on streams of its own, which must wait for the producer's work.
    """
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def wait_for_producer(device: torch.device) -> None:
    """Blocks until torch's current stream on ``device`` has run everything enqueued on it (a
    no-op on the CPU): needed before another process is told it may read memory written there,
    since no stream of that process is ordered after ours."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
