# SPDX-License-Identifier: Apache-2.0
"""Transfer engine: batches of region-to-region copies, run asynchronously by the C++ core."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from epdrt import _core
from epdrt.errors import InvalidArgument, TransferError
from epdrt.region import Region

#: One copy: (source region, source offset, destination region, destination offset, bytes).
Op = tuple[Region, int, Region, int, int]


def _int64_array(name: str, values: Any) -> np.ndarray:
    """A contiguous 1-D int64 array of ``values`` (list, numpy array or CPU torch tensor)."""
    if type(values) is np.ndarray and values.dtype == np.int64 and values.flags.c_contiguous:
        if values.ndim != 1:
            raise InvalidArgument(f"{name} must be 1-D, got shape {values.shape}")
        return values  # already what the core takes: the per-transfer fast path
    if hasattr(values, "numpy") and hasattr(values, "device"):  # torch.Tensor
        values = values.detach().cpu().numpy()
    arr = np.ascontiguousarray(values, dtype=np.int64)
    if arr.ndim != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _stream_handle(after_stream: Any) -> int | None:
    """``after_stream`` checked: None, or a ``cudaStream_t`` as a non-negative 64-bit int."""
    if after_stream is None:
        return None
    ok = isinstance(after_stream, int) and not isinstance(after_stream, bool)
    if not ok or not 0 <= after_stream < 1 << 64:
        raise InvalidArgument(
            "after_stream must be None or a raw cudaStream_t handle as an int (e.g."
            f" torch.cuda.current_stream().cuda_stream), got {after_stream!r}"
        )
    return after_stream


class Transfer:
    """Handle of one submitted batch: poll with :meth:`done`, block with :meth:`wait`."""

    __slots__ = ("_handle",)

    def __init__(self, handle: _core.TransferHandle) -> None:
        self._handle = handle

    def done(self) -> bool:
        """True once the copies finished (or failed); never blocks."""
        return self._handle.done()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the copies are done (GIL released).

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the copies go on).
            TransferError: the copies failed (e.g. a CUDA error).
        """
        if not self._handle.wait(timeout):
            raise TimeoutError(
                f"transfer of {self.nbytes} bytes ({self.num_ops} ops) not done after {timeout} s"
            )

    def release(self) -> None:
        """Drops the references to the regions once finished (no-op while pending)."""
        self._handle.release()

    @property
    def state(self) -> str:
        """ "pending", "done" or "failed"."""
        return self._handle.state

    @property
    def error(self) -> str:
        return self._handle.error

    @property
    def nbytes(self) -> int:
        return self._handle.nbytes

    @property
    def num_ops(self) -> int:
        return self._handle.num_ops

    @property
    def num_runs(self) -> int:
        """Contiguous copies after coalescing adjacent ops."""
        return self._handle.num_runs

    @property
    def path(self) -> str:
        """How the bytes move: "none", "host-inline" (copied by ``submit``), "host-threads",
        "cuda-same-device", "cuda-peer-access" or "cuda-peer-memcpy" (no peer access: staged
        through the host, the slow path)."""
        return self._handle.path

    def __repr__(self) -> str:
        return (
            f"Transfer({self.state}, nbytes={self.nbytes}, ops={self.num_ops},"
            f" runs={self.num_runs})"
        )


class TransferEngine:
    """Runs copies between regions asynchronously; ``submit`` never waits for them.

    CPU regions are copied by ``num_threads`` worker threads (0: min(4, CPU count)), or by
    ``submit`` itself up to ``inline_bytes``; CUDA
    regions on one stream per peer (few runs: ``cudaMemcpyAsync``; many: one block-copy kernel
    launch), completion tracked by an event. Adjacent ops (continuing each other in source and
    destination) are coalesced into one copy.

    A batch is checked before anything is copied; InvalidArgument rejects it whole when an op is
    out of bounds, uses a closed region, mixes CPU and CUDA, or when destination ranges overlap
    each other or a source range.

    NOTE: the engine's CUDA streams are its own (non-blocking): nothing orders them after the
    stream that wrote the source (e.g. the vision tower's, on torch's current stream) unless
    ``after_stream`` says so. Pass ``after_stream=torch.cuda.current_stream(dev).cuda_stream``
    whenever the source may still be being written by queued GPU work.
    """

    def __init__(self, num_threads: int = 0, inline_bytes: int | None = None) -> None:
        """``inline_bytes``: CPU transfers up to this many bytes are copied by ``submit`` on the
        calling thread (a worker's wake-up costs more than such a copy); None: the core's
        default (256 KiB), 0: never."""
        if inline_bytes is None:
            self._engine = _core.TransferEngine(num_threads)
        else:
            self._engine = _core.TransferEngine(num_threads, inline_bytes)

    @property
    def num_threads(self) -> int:
        return self._engine.num_threads

    @property
    def inline_bytes(self) -> int:
        return self._engine.inline_bytes

    @property
    def completion_fd(self) -> int:
        """An eventfd that becomes readable whenever one of this engine's transfers ends."""
        return self._engine.completion_fd

    def submit(
        self, ops: Iterable[Op], *, peer: int = 0, after_stream: int | None = None
    ) -> Transfer:
        """Starts ``ops``: ``(src, src_offset, dst, dst_offset, nbytes)`` tuples of Regions.

        Args:
            ops: offsets and sizes in bytes.
            peer: picks the CUDA stream (0: one per destination region); transfers with the
                same peer run in submission order.
            after_stream: a raw ``cudaStream_t`` handle as an int (what
                ``torch.cuda.current_stream(dev).cuda_stream`` returns; 0 is the legacy default
                stream), or None. The copies of a CUDA transfer start only after the work
                enqueued on that stream before this call; the call itself never blocks. Handles
                meaning "the current device's" stream (0, 1, 2) refer to the calling thread's
                current device. Ignored for CPU transfers: a host producer has finished writing
                when it submits.

        Raises:
            InvalidArgument: a bad op or ``after_stream`` (nothing is copied).
        """
        stream = _stream_handle(after_stream)
        raw = []
        for i, op in enumerate(ops):
            if len(op) != 5 or not isinstance(op[0], Region) or not isinstance(op[2], Region):
                raise InvalidArgument(
                    f"transfer op {i} must be (Region, int, Region, int, int), got {op!r}"
                )
            src, src_offset, dst, dst_offset, nbytes = op
            raw.append((src._handle, src_offset, dst._handle, dst_offset, nbytes))
        return Transfer(self._engine.submit(raw, peer, stream))

    def submit_blocks(
        self,
        src: Region,
        dst: Region,
        src_offsets: Sequence[int] | np.ndarray,
        dst_offsets: Sequence[int] | np.ndarray,
        nbytes: int | Sequence[int] | np.ndarray,
        *,
        peer: int = 0,
        after_stream: int | None = None,
    ) -> Transfer:
        """Copies ``src[src_offsets[i]:+n]`` to ``dst[dst_offsets[i]:+n]`` for every i.

        Args:
            src_offsets: ``[n] int64``, byte offset of each op in ``src``.
            dst_offsets: ``[n] int64``, byte offset of each op in ``dst``.
            nbytes: bytes of every op (int), or ``[n] int64`` one size per op.
            peer: as in :meth:`submit`.
            after_stream: as in :meth:`submit`: CUDA copies start after the work already
                enqueued on this ``cudaStream_t`` (an int); ignored for CPU transfers.
        """
        stream = _stream_handle(after_stream)
        so = _int64_array("src_offsets", src_offsets)
        do = _int64_array("dst_offsets", dst_offsets)
        sizes: Any = nbytes if isinstance(nbytes, int) else _int64_array("nbytes", nbytes)
        return Transfer(
            self._engine.submit_blocks(src._handle, dst._handle, so, do, sizes, peer, stream)
        )

    def __repr__(self) -> str:
        return f"TransferEngine(num_threads={self.num_threads})"


__all__ = ["Op", "Transfer", "TransferEngine", "TransferError"]
