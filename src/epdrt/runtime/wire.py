# SPDX-License-Identifier: Apache-2.0
"""Wire format of control messages: a msgspec (msgpack) struct, then raw tensor frames.

Nothing received is ever unpickled: a frame is either a typed ``msgspec`` struct from the
``Message`` union or the raw bytes of a tensor whose dtype (from a fixed whitelist) and shape
the struct names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import torch

from epdrt.errors import EpdrtError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class WireError(EpdrtError):
    """A received frame set is malformed (bad struct, unknown dtype, size mismatch)."""


class TensorMeta(msgspec.Struct, frozen=True):
    """Dtype name and shape of one tensor frame."""

    dtype: str
    shape: tuple[int, ...]


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    if t.dtype not in _DTYPE_NAMES:
        raise WireError(f"cannot send dtype {t.dtype}")
    return TensorMeta(_DTYPE_NAMES[t.dtype], tuple(t.shape))


def tensor_frame(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (made contiguous; bf16 sent as its 16-bit pattern)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def tensor_from_frame(meta: TensorMeta, frame: bytes | memoryview) -> torch.Tensor:
    """A new CPU tensor from a frame; checks dtype and byte count against ``meta``."""
    dtype = _DTYPES.get(meta.dtype)
    if dtype is None:
        raise WireError(f"unknown dtype {meta.dtype!r} in a tensor frame")
    if any(s < 0 for s in meta.shape):
        raise WireError(f"negative size in tensor shape {meta.shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(meta.shape) * itemsize
    if len(frame) != expected:
        raise WireError(f"tensor frame has {len(frame)} bytes, {meta} needs {expected}")
    if expected == 0:
        return torch.empty(meta.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
    return raw.view(dtype).reshape(meta.shape)


class Codec:
    """Encodes/decodes one ``msgspec`` tagged-union type plus its trailing tensor frames."""

    def __init__(self, union: object) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(union)

    def encode(self, msg: msgspec.Struct, tensors: Sequence[torch.Tensor] = ()) -> list:
        return [self._encoder.encode(msg), *(tensor_frame(t) for t in tensors)]

    def decode(self, frames: Sequence[bytes | memoryview]) -> tuple[object, list[bytes]]:
        """The struct and the raw tensor frames after it (decode them with their metas)."""
        if not frames:
            raise WireError("empty message")
        try:
            msg = self._decoder.decode(frames[0])
        except msgspec.DecodeError as exc:
            raise WireError(f"malformed control message: {exc}") from exc
        return msg, list(frames[1:])
