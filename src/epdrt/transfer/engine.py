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
    if hasattr(values, "numpy") and hasattr(values, "device"):  # torch.Tensor
        values = values.detach().cpu().numpy()
    arr = np.ascontiguousarray(values, dtype=np.int64)
    if arr.ndim != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


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

    def __repr__(self) -> str:
        return (
            f"Transfer({self.state}, nbytes={self.nbytes}, ops={self.num_ops},"
            f" runs={self.num_runs})"
        )


class TransferEngine:
    """Runs copies between regions asynchronously; ``submit`` never waits for them.

    CPU regions are copied by ``num_threads`` worker threads (0: min(4, CPU count)); CUDA
    regions on one stream per peer (few runs: ``cudaMemcpyAsync``; many: one block-copy kernel
    launch), completion tracked by an event. Adjacent ops (continuing each other in source and
    destination) are coalesced into one copy.

    A batch is checked before anything is copied; InvalidArgument rejects it whole when an op is
    out of bounds, uses a closed region, mixes CPU and CUDA, or when destination ranges overlap
    each other or a source range.
    """

    def __init__(self, num_threads: int = 0) -> None:
        self._engine = _core.TransferEngine(num_threads)

    @property
    def num_threads(self) -> int:
        return self._engine.num_threads

    @property
    def completion_fd(self) -> int:
        """An eventfd that becomes readable whenever one of this engine's transfers ends."""
        return self._engine.completion_fd

    def submit(self, ops: Iterable[Op], *, peer: int = 0) -> Transfer:
        """Starts ``ops``: ``(src, src_offset, dst, dst_offset, nbytes)`` tuples of Regions.

        ``peer`` picks the CUDA stream (0: one per destination region).
        """
        raw = []
        for i, op in enumerate(ops):
            if len(op) != 5 or not isinstance(op[0], Region) or not isinstance(op[2], Region):
                raise InvalidArgument(
                    f"transfer op {i} must be (Region, int, Region, int, int), got {op!r}"
                )
            src, src_offset, dst, dst_offset, nbytes = op
            raw.append((src._handle, src_offset, dst._handle, dst_offset, nbytes))
        return Transfer(self._engine.submit(raw, peer))

    def submit_blocks(
        self,
        src: Region,
        dst: Region,
        src_offsets: Sequence[int] | np.ndarray,
        dst_offsets: Sequence[int] | np.ndarray,
        nbytes: int | Sequence[int] | np.ndarray,
        *,
        peer: int = 0,
    ) -> Transfer:
        """Copies ``src[src_offsets[i]:+n]`` to ``dst[dst_offsets[i]:+n]`` for every i.

        Args:
            src_offsets: ``[n] int64``, byte offset of each op in ``src``.
            dst_offsets: ``[n] int64``, byte offset of each op in ``dst``.
            nbytes: bytes of every op (int), or ``[n] int64`` one size per op.
        """
        so = _int64_array("src_offsets", src_offsets)
        do = _int64_array("dst_offsets", dst_offsets)
        sizes: Any = nbytes if isinstance(nbytes, int) else _int64_array("nbytes", nbytes)
        return Transfer(self._engine.submit_blocks(src._handle, dst._handle, so, do, sizes, peer))

    def __repr__(self) -> str:
        return f"TransferEngine(num_threads={self.num_threads})"


__all__ = ["Op", "Transfer", "TransferEngine", "TransferError"]
