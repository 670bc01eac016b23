# SPDX-License-Identifier: Apache-2.0
"""Memory regions: one arena per cache, shared with other processes by a small descriptor."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import torch

from epdrt import _core
from epdrt.device import CUDA_TYPE, Device, as_device, require_cuda
from epdrt.errors import EpdrtError, InvalidArgument

#: Bytes of an exported region descriptor.
DESCRIPTOR_BYTES: int = _core.REGION_DESCRIPTOR_BYTES


def _descriptor_bytes(descriptor: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(descriptor, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"a region descriptor is bytes, not {type(descriptor).__name__}")
    return bytes(descriptor)


def _consumer_device(device: str | int | torch.device | Device | None) -> int:
    """CUDA ordinal a CUDA region is opened for: ``device``, or torch's current device."""
    dev = Device(CUDA_TYPE) if device is None else as_device(device)
    if not dev.is_cuda:
        raise InvalidArgument(f"a CUDA region is opened on a CUDA device, not {dev}")
    require_cuda(dev)
    return torch.cuda.current_device() if device is None else dev.index


@dataclass(frozen=True)
class RegionDescriptor:
    """The fields of an exported region descriptor (:meth:`Region.describe`).

    ``device`` is where the memory lives, numbered as in the creator's process; its
    ``device_uuid`` (``cudaDeviceProp::uuid``, the nil UUID for the CPU) names that device in
    every process of the host, whatever their ``CUDA_VISIBLE_DEVICES``.
    """

    device: Device
    device_uuid: uuid.UUID
    nbytes: int
    id: int
    creator_pid: int


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
    handle. ``export()`` gives a 120-byte descriptor; ``Region.open(descriptor)`` in another
    process maps the same memory without copying (the creator must still be alive then).

    A CUDA region knows two devices, both numbered as in this process: ``device``, where its
    memory lives, and ``opened_on``, the device whose CUDA context maps it here (views and
    copies run there). They differ only for a region opened from a peer on another GPU.

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
    def open(
        cls,
        descriptor: bytes | bytearray | memoryview,
        device: str | int | torch.device | Device | None = None,
    ) -> Region:
        """Maps the region a peer exported, without copying.

        Args:
            descriptor: what the creator's :meth:`export` returned.
            device: for a CUDA region, the CUDA device of this process that will use it (None:
                torch's current device). The region is mapped on it when it can reach the
                memory (it holds it, or has peer access to the device that does), so no CUDA
                context is made on the owner's GPU; otherwise on the owner's device. Ignored for
                CPU regions, and when the creator opens its own region (the live region is
                returned).

        Raises:
            InvalidArgument: a malformed descriptor, or ``device`` is not a CUDA device.
            RegionError: the creator is gone or closed the region, or the GPU that holds it is
                not visible in this process.
        """
        raw = _descriptor_bytes(descriptor)
        consumer = None
        if _core.RegionHandle.parse(raw)["device_type"] == CUDA_TYPE:
            consumer = _consumer_device(device)
        return cls(_core.RegionHandle.open(raw, consumer))

    @staticmethod
    def describe(descriptor: bytes | bytearray | memoryview) -> RegionDescriptor:
        """The fields of a descriptor; opens nothing. InvalidArgument unless well-formed."""
        fields = _core.RegionHandle.parse(_descriptor_bytes(descriptor))
        return RegionDescriptor(
            device=Device(fields["device_type"], fields["device_index"]),
            device_uuid=uuid.UUID(bytes=fields["device_uuid"]),
            nbytes=fields["nbytes"],
            id=fields["id"],
            creator_pid=fields["creator_pid"],
        )

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
        """Where the memory lives (CUDA ordinal as numbered in this process)."""
        return Device(self._handle.device_type, self._handle.device_index)

    @property
    def opened_on(self) -> Device:
        """The device whose context maps the memory here; ``device`` unless opened elsewhere."""
        return Device(self._handle.device_type, self._handle.opened_on_index)

    @property
    def device_uuid(self) -> uuid.UUID:
        """UUID of ``device`` (``cudaDeviceProp::uuid``); the nil UUID for the CPU."""
        return uuid.UUID(bytes=self._handle.device_uuid)

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
            return torch.empty(shape, dtype=dtype, device=self.opened_on.torch)
        if self.device.is_cuda:
            ptr = self.data_ptr + offset
            raw = torch.as_tensor(
                _CudaArrayView(self._handle, ptr, nbytes), device=self.opened_on.torch
            )
            if raw.data_ptr() != ptr:  # torch copied instead of viewing: never hand that out
                raise EpdrtError(f"torch made a copy instead of a view of {self!r}")
        else:
            raw = torch.frombuffer(self._handle, dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.view(dtype).view(shape)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        role = "owner" if self.is_owner else "peer"
        where = f"device={self.device}"
        if self.opened_on != self.device:
            where += f", opened_on={self.opened_on}"
        return f"Region(nbytes={self.nbytes}, {where}, {role}, {state})"
