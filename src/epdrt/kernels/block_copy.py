# SPDX-License-Identifier: Apache-2.0
"""Many-block copy between two regions or tensors: (source block, destination block) pairs in
one launch. CUDA kernel (``kernels/block_copy.cu``) or host memcpy threads from the C++ core,
Triton where the CUDA kernel is not compiled, and the torch reference."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from epdrt import _core
from epdrt.errors import CudaUnavailable, InvalidArgument
from epdrt.kernels import reference as refs
from epdrt.region import Region

from . import _common as c

CopyBackend = Literal["auto", "native", "triton", "torch"]
COPY_BACKENDS = ("auto", "native", "triton", "torch")
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

Buffer = Region | torch.Tensor


@dataclass(frozen=True)
class _Bytes:
    """A buffer as bytes: ``data`` is a 1-D uint8 view that keeps the memory alive."""

    data: torch.Tensor
    ptr: int
    nbytes: int
    device: torch.device


def _as_bytes(name: str, buf: object) -> _Bytes:
    if isinstance(buf, Region):
        if buf.closed:
            raise InvalidArgument(f"{name}: the region is closed")
        data = buf.tensor(torch.uint8, (buf.nbytes,))
        return _Bytes(data, buf.data_ptr, buf.nbytes, buf.device.torch)
    if isinstance(buf, torch.Tensor):
        c.contiguous(name, buf)
        if buf.numel() == 0:
            data = buf.new_empty(0, dtype=torch.uint8)
        else:
            data = buf.reshape(-1).view(torch.uint8)
        return _Bytes(data, buf.data_ptr(), data.numel(), buf.device)
    raise InvalidArgument(f"{name} must be a Region or a torch.Tensor, got {type(buf).__name__}")


def _as_pairs(pairs: object, device: torch.device) -> torch.Tensor:
    if isinstance(pairs, torch.Tensor):
        p = c.tensor("pairs", pairs, 2, dtype=(torch.int64, torch.int32))
        if p.device.type != "cpu" and p.device != device:
            raise InvalidArgument(f"pairs is on {p.device}; the buffers are on {device}")
    elif isinstance(pairs, Sequence):
        try:
            p = torch.tensor([list(x) for x in pairs], dtype=torch.int64).reshape(-1, 2)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgument(f"pairs must be (src block, dst block) pairs: {exc}") from exc
    else:
        raise InvalidArgument(f"pairs must be an [n, 2] tensor, got {type(pairs).__name__}")
    if p.shape[1] != 2:
        raise InvalidArgument(f"pairs must have shape [n, 2], got {list(p.shape)}")
    return p.long().contiguous()


def _nonneg(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise InvalidArgument(f"{name} must be an int >= 0, got {v!r}")
    return v


def default_threads() -> int:
    """Host copy threads: the cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


class BlockCopy:
    """A checked many-block copy, ready to :meth:`run` (any number of times).

    Block ``b`` of a buffer is bytes ``[offset + b * stride, offset + b * stride + block_bytes)``;
    run() copies block ``pairs[i, 0]`` of ``src`` to block ``pairs[i, 1]`` of ``dst`` for every i.

    Args:
        src: Region or contiguous tensor (its bytes), read.
        dst: Region or contiguous tensor on the same device, written.
        pairs: ``[n, 2]`` int64/int32 tensor (on the CPU or the buffers' device) or a sequence
            of ``(src_block, dst_block)``. Destination blocks unique; a source block may repeat.
        block_bytes: bytes per block (> 0).
        src_stride, dst_stride: bytes from one block to the next, ``>= block_bytes`` (default
            ``block_bytes``): e.g. ``PagedKVCache.block_nbytes`` with ``block_bytes =
            layer_nbytes`` and ``src_offset = layer * layer_nbytes`` copies one layer.
        src_offset, dst_offset: byte offset of block 0.
        backend: "auto" (CUDA kernel, else Triton, on GPU; memcpy threads on CPU), "native"
            (C++ core), "triton" (on CPU only under ``TRITON_INTERPRET=1``) or "torch".
        num_threads: host copy threads (native CPU path); default :func:`default_threads`.
        check_indices: check block ranges, unique destinations, and that no destination
            overlaps a source block (one device sync when pairs are on the GPU).

    NOTE: on CUDA, run() is asynchronous on the current stream; this object keeps both buffers
    and its op list alive, so keep it (or synchronize) until the stream has passed the copy.
    """

    def __init__(
        self,
        src: Buffer,
        dst: Buffer,
        pairs: torch.Tensor | Sequence[tuple[int, int]],
        block_bytes: int,
        *,
        src_stride: int | None = None,
        dst_stride: int | None = None,
        src_offset: int = 0,
        dst_offset: int = 0,
        backend: CopyBackend = "auto",
        num_threads: int | None = None,
        check_indices: bool = True,
    ) -> None:
        if backend not in COPY_BACKENDS:
            raise InvalidArgument(f"backend must be one of {COPY_BACKENDS}, got {backend!r}")
        self.src, self.dst = _as_bytes("src", src), _as_bytes("dst", dst)
        self.device = self.src.device
        if self.dst.device != self.device:
            raise InvalidArgument(f"src is on {self.device}, dst on {self.dst.device}")
        if self.device.type not in ("cpu", "cuda"):
            raise InvalidArgument(f"unsupported device {self.device}")
        if not isinstance(block_bytes, int) or isinstance(block_bytes, bool) or block_bytes <= 0:
            raise InvalidArgument(f"block_bytes must be a positive int, got {block_bytes!r}")
        self.block_bytes = block_bytes
        self.src_stride = _nonneg("src_stride", block_bytes if src_stride is None else src_stride)
        self.dst_stride = _nonneg("dst_stride", block_bytes if dst_stride is None else dst_stride)
        for name, stride in (("src_stride", self.src_stride), ("dst_stride", self.dst_stride)):
            if stride < block_bytes:
                raise InvalidArgument(f"{name} {stride} is less than block_bytes {block_bytes}")
        self.src_offset = _nonneg("src_offset", src_offset)
        self.dst_offset = _nonneg("dst_offset", dst_offset)
        self.pairs = _as_pairs(pairs, self.device)
        self.num_pairs = self.pairs.shape[0]
        if num_threads is None:
            num_threads = default_threads()
        elif not isinstance(num_threads, int) or num_threads < 1:
            raise InvalidArgument(f"num_threads must be an int >= 1, got {num_threads!r}")
        self.num_threads = num_threads
        if check_indices:
            self._check_indices()
        self.backend = self._choose(backend)
        self._ops: torch.Tensor | None = None
        self._words: tuple[torch.Tensor, torch.Tensor, int] | None = None
        if self.backend == "native":
            self._ops = self._make_ops()
        elif self.backend == "triton":
            self._kernel = c.triton_module("block_copy", self.device)
            self._words = self._word_views()
            self._dev_pairs = self.pairs.to(self.device)
        else:
            self._dev_pairs = self.pairs.to(self.device)

    @property
    def nbytes(self) -> int:
        """Bytes one run() copies."""
        return self.num_pairs * self.block_bytes

    def run(self) -> None:
        """Performs the copies (asynchronously on the current stream for CUDA buffers)."""
        if self.num_pairs == 0:
            return
        if self.backend == "native":
            assert self._ops is not None
            if self.device.type == "cpu":
                _core.block_copy_host(self._ops.data_ptr(), self.num_pairs, self.num_threads)
            else:
                with torch.cuda.device(self.device):
                    stream = torch.cuda.current_stream(self.device).cuda_stream
                    _core.block_copy_cuda(
                        self._ops.data_ptr(), self.num_pairs, stream, self.block_bytes
                    )
        elif self.backend == "triton":
            assert self._words is not None
            src, dst, w = self._words
            with c.on_device(self.device):
                self._kernel.launch(
                    src, dst, self._dev_pairs, self.block_bytes // w,
                    self.src_stride // w, self.dst_stride // w,
                    self.src_offset // w, self.dst_offset // w,
                )  # fmt: skip
        else:
            refs.block_copy(
                self.src.data, self.dst.data, self._dev_pairs, self.block_bytes,
                src_stride=self.src_stride, dst_stride=self.dst_stride,
                src_offset=self.src_offset, dst_offset=self.dst_offset,
            )  # fmt: skip

    # ---- setup -----------------------------------------------------------------------------
    def _choose(self, backend: str) -> str:
        if backend == "auto":
            if self.device.type == "cuda" and not _core.cuda_compiled:
                return "triton"
            return "native"
        if backend == "native" and self.device.type == "cuda" and not _core.cuda_compiled:
            raise CudaUnavailable("epdrt was built without CUDA: use backend='triton'")
        return backend

    def _check_indices(self) -> None:
        src_blocks, dst_blocks = self.pairs[:, 0], self.pairs[:, 1]
        for name, blocks, buf, off, stride in (
            ("source blocks", src_blocks, self.src, self.src_offset, self.src_stride),
            ("destination blocks", dst_blocks, self.dst, self.dst_offset, self.dst_stride),
        ):
            room = buf.nbytes - off - self.block_bytes
            count = room // stride + 1 if room >= 0 else 0
            c.in_range(f"{name} (buffer of {buf.nbytes} bytes)", blocks, 0, count)
        c.unique("destination blocks", dst_blocks)
        lo = max(self.src.ptr, self.dst.ptr)
        hi = min(self.src.ptr + self.src.nbytes, self.dst.ptr + self.dst.nbytes)
        if self.num_pairs and lo < hi:  # the buffers share memory: no source may be a target
            starts = torch.sort(self.dst.ptr + self.dst_offset + dst_blocks * self.dst_stride)[0]
            reads = self.src.ptr + self.src_offset + src_blocks * self.src_stride
            i = torch.searchsorted(starts, reads - self.block_bytes, right=True)
            hit = i < starts.numel()
            clash = hit & (starts[i.clamp(max=starts.numel() - 1)] < reads + self.block_bytes)
            if bool(clash.any()):
                raise InvalidArgument("a destination block overlaps a source block")

    def _make_ops(self) -> torch.Tensor:
        """CopyOp rows ``[n, 3]`` int64 (src address, dst address, nbytes) on the device."""
        p = self.pairs
        ops = torch.empty((self.num_pairs, 3), dtype=torch.int64, device=p.device)
        ops[:, 0] = p[:, 0] * self.src_stride + (self.src.ptr + self.src_offset)
        ops[:, 1] = p[:, 1] * self.dst_stride + (self.dst.ptr + self.dst_offset)
        ops[:, 2] = self.block_bytes
        return ops.to(self.device)

    def _word_views(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Both buffers as 1-D views of the widest word dividing every size and address."""
        values = (self.block_bytes, self.src_stride, self.dst_stride, self.src_offset,
                  self.dst_offset, self.src.ptr, self.dst.ptr)  # fmt: skip
        w = next(w for w in (8, 4, 2, 1) if all(v % w == 0 for v in values))
        src = self.src.data[: self.src.nbytes // w * w].view(_WORDS[w])
        dst = self.dst.data[: self.dst.nbytes // w * w].view(_WORDS[w])
        return src, dst, w


def block_copy(
    src: Buffer,
    dst: Buffer,
    pairs: torch.Tensor | Sequence[tuple[int, int]],
    block_bytes: int,
    *,
    src_stride: int | None = None,
    dst_stride: int | None = None,
    src_offset: int = 0,
    dst_offset: int = 0,
    backend: CopyBackend = "auto",
    num_threads: int | None = None,
    check_indices: bool = True,
) -> None:
    """Copies block ``pairs[i, 0]`` of ``src`` to block ``pairs[i, 1]`` of ``dst``, all in one
    launch. Arguments as for :class:`BlockCopy`; asynchronous on the current stream for CUDA
    buffers (the op list lives in the caching allocator, so stream order keeps it valid).
    """
    BlockCopy(
        src, dst, pairs, block_bytes, src_stride=src_stride, dst_stride=dst_stride,
        src_offset=src_offset, dst_offset=dst_offset, backend=backend,
        num_threads=num_threads, check_indices=check_indices,
    ).run()  # fmt: skip
