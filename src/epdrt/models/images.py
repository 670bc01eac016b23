# SPDX-License-Identifier: Apache-2.0
"""Image decoding with admission checks, and content digests of decoded pixels."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

from PIL import Image

from epdrt.models._compat import convert_to_rgb
from epdrt.models.errors import RequestError
from epdrt.models.types import ImageLimits

#: What ``load_image`` accepts: a file path, the encoded bytes, or a PIL image.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

DIGEST_SIZE = 32  # bytes (256 bits)


def digest(*parts: bytes) -> bytes:
    """BLAKE2b-256 of ``parts``, each length-prefixed so that boundaries cannot shift."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def load_image(src: ImageSource, limits: ImageLimits | None = None) -> Image.Image:
    """Decodes ``src`` into an RGB PIL image, checking it against ``limits``.

    Conversion to RGB is the one the installed HF image processors apply (``convert_to_rgb``;
    5.2x composites alpha over white, 5.17 drops it), so preprocessing sees the pixels the
    processor would, whatever the input form.

    Raises:
        RequestError: unreadable file, too many bytes, unsupported format, too many pixels, or
            corrupt / truncated data.
    """
    limits = limits or ImageLimits()
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, limits, "the image")
        try:
            src.load()
        except Exception as exc:  # PIL raises many types for bad data
            raise RequestError(f"could not decode the image: {exc}") from exc
        return _to_rgb(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise RequestError(
                    f"image file {path} has {size} bytes, more than the limit {limits.max_bytes}"
                )
            data = path.read_bytes()
        except OSError as exc:
            raise RequestError(f"could not read image file {path}: {exc}") from exc
        what = f"image file {path}"
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        what = "the image bytes"
    else:
        raise RequestError(
            f"an image must be a path, bytes or a PIL image, got {type(src).__name__}"
        )
    if len(data) > limits.max_bytes:
        raise RequestError(f"{what}: {len(data)} bytes, more than the limit {limits.max_bytes}")
    if not data:
        raise RequestError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"{what}: {exc}") from exc
    except Exception as exc:
        raise RequestError(f"{what} is not a readable image ({exc})") from exc
    if img.format not in limits.formats:
        raise RequestError(
            f"{what}: format {img.format} is not accepted (accepted: {sorted(limits.formats)})"
        )
    _check_pixels(img.width, img.height, limits, what)
    try:
        img.load()  # decodes the pixels: truncated or corrupt data fails here
    except Exception as exc:
        raise RequestError(f"{what}: corrupt {img.format} data ({exc})") from exc
    return _to_rgb(img)


def pixel_digest(img: Image.Image) -> bytes:
    """BLAKE2b-256 of the size, mode and raw pixel bytes of ``img`` (an RGB image)."""
    header = f"{img.mode}:{img.width}x{img.height}".encode()
    return digest(header, img.tobytes())


def _check_pixels(width: int, height: int, limits: ImageLimits, what: str) -> None:
    if width <= 0 or height <= 0:
        raise RequestError(f"{what} has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise RequestError(
            f"{what} is {width}x{height} = {width * height} pixels, more than the limit"
            f" {limits.max_pixels}"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    try:
        return convert_to_rgb(img)
    except Exception as exc:
        raise RequestError(f"could not convert the image (mode {img.mode}) to RGB: {exc}") from exc
