# SPDX-License-Identifier: Apache-2.0
"""Memory regions: one arena per cache, shared with other processes by a small descriptor."""

from __future__ import annotations

import math

import torch

from epdrt import _core
from epdrt.device import Device, as_device, require_cuda
from epdrt.errors import InvalidArgument


class _CudaArrayView:
    """``nbytes`` bytes at ``ptr`` as a ``__cuda_array_interface__``; keeps the owner alive."""

    def __init__(self, owner: _core.RegionHandle, ptr: int, nbytes: int) -> None:
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


class Region:
    """One contiguous arena of ``nbytes`` on a device.

    CPU regions are anonymous shared memory (memfd): nothing appears in /dev/shm and nothing
    leaks when a process is killed. CUDA regions are one ``cudaMalloc`` exported as a CUDA IPC
    handle. ``export()`` gives a 104-byte descriptor; ``Region.open(descriptor)`` in another
    process maps the same memory without copying (the creator must still be alive then).

    Ownership: the memory lives until this object and every tensor view of it are gone.
    ``close()`` stops new use (views, exports, transfers) and lets peers no longer open it.
    """

    def __init__(self, handle: _core.RegionHandle) -> None:
        self._handle = handle

    @classmethod
    def create(cls, nbytes: int, device: str | int | torch.device | Device = "cpu") -> Region:
        """Allocates a new region of ``nbytes`` bytes on ``device``."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise InvalidArgument(f"nbytes must be a positive int, got {nbytes!r}")
        dev = as_device(device)
        require_cuda(dev)
        return cls(_core.RegionHandle.create(nbytes, dev.type, dev.index))

    @classmethod
    def open(cls, descriptor: bytes) -> Region:
        """Maps the region a peer exported. Raises RegionError if its creator is gone."""
        if not isinstance(descriptor, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"a region descriptor is bytes, not {type(descriptor).__name__}")
        return cls(_core.RegionHandle.open(bytes(descriptor)))

    def export(self) -> bytes:
        """A descriptor any process on this host can pass to :meth:`open`."""
        return self._handle.export()

    def close(self) -> None:
        """Stops new use of the region. Memory is freed once no view refers to it."""
        self._handle.close()

    @property
    def nbytes(self) -> int:
        return self._handle.nbytes

    @property
    def device(self) -> Device:
        return Device(self._handle.device_type, self._handle.device_index)

    @property
    def data_ptr(self) -> int:
        """Address of the first byte (a device pointer for CUDA regions)."""
        return self._handle.data_ptr

    @property
    def id(self) -> int:
        """Random 64-bit identity, the same in the creator and every process that opened it."""
        return self._handle.id

    @property
    def is_owner(self) -> bool:
        return self._handle.is_owner

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def tensor(
        self, dtype: torch.dtype, shape: tuple[int, ...] | list[int], offset: int = 0
    ) -> torch.Tensor:
        """A contiguous tensor view of ``shape`` and ``dtype`` starting ``offset`` bytes in.

        No copy: writes through the view land in the region (and in every peer's mapping).
        ``offset`` must be a multiple of the dtype's size; the view must fit in the region.
        """
        if self.closed:
            raise InvalidArgument("the region is closed")
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgument(f"dtype must be a torch.dtype, got {dtype!r}")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise InvalidArgument(f"negative size in shape {shape}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if offset < 0 or offset % itemsize:
            raise InvalidArgument(
                f"offset {offset} is not a multiple of {dtype}'s {itemsize} bytes"
            )
        if offset + nbytes > self.nbytes:
            raise InvalidArgument(
                f"a {dtype} view of shape {shape} at offset {offset} needs {offset + nbytes} bytes;"
                f" the region has {self.nbytes}"
            )
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=self.device.torch)
        if self.device.is_cuda:
            view = _CudaArrayView(self._handle, self.data_ptr + offset, nbytes)
            raw = torch.as_tensor(view, device=self.device.torch)
        else:
            raw = torch.frombuffer(self._handle, dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.view(dtype).view(shape)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        role = "owner" if self.is_owner else "peer"
        return f"Region(nbytes={self.nbytes}, device={self.device}, {role}, {state})"
