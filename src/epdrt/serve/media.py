# SPDX-License-Identifier: Apache-2.0
"""Image URLs of chat messages as bytes: ``data:`` URLs, and ``file://`` under an allowed
directory. Nothing is fetched over the network: a remote ``http(s)`` URL is refused.

The bytes go to the cluster, whose preprocessor decodes and checks them (format, size, pixel
count, corrupt files): this module only gets them, within ``max_bytes``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlsplit

from epdrt.serve.protocol import ApiError

#: Media types a ``data:`` URL may carry.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")


def image_bytes(url: str, *, allowed_dir: Path | None, max_bytes: int) -> bytes:
    """The bytes an ``image_url`` names; ApiError 400 for anything it may not or cannot be."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, max_bytes)
    if scheme == "file":
        return _local_file(url, allowed_dir, max_bytes)
    if scheme in ("http", "https"):
        raise ApiError(
            400, "remote image URLs are not fetched: send the image as a data: URL",
            param="image_url",
        )  # fmt: skip
    raise ApiError(400, f"unsupported image URL scheme {scheme or url[:16]!r}", param="image_url")


def _data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ApiError(400, "a data: URL needs a ',' before its payload", param="image_url")
    media, *params = header[len("data:") :].split(";")
    if media.lower() not in IMAGE_TYPES:
        raise ApiError(
            400, f"unsupported image type {media!r}; expected one of {', '.join(IMAGE_TYPES)}",
            param="image_url",
        )  # fmt: skip
    if "base64" not in (p.lower() for p in params):
        raise ApiError(400, "image data: URLs must be base64-encoded", param="image_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(400, _too_large(len(payload) * 3 // 4, max_bytes), param="image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"the image data: URL is not valid base64: {exc}") from exc


def _local_file(url: str, allowed_dir: Path | None, max_bytes: int) -> bytes:
    if allowed_dir is None:
        raise ApiError(
            400, "file: image URLs are off (start the server with --allowed-local-media-path)",
            param="image_url",
        )  # fmt: skip
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, f"file: URLs name a local path, got host {parts.netloc!r}")
    path = Path(unquote(parts.path)).resolve()
    root = allowed_dir.resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"{path} is outside the allowed media path", param="image_url",
                       kind="permission_error")  # fmt: skip
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ApiError(400, _too_large(size, max_bytes), param="image_url")
        return path.read_bytes()
    except OSError as exc:
        raise ApiError(400, f"cannot read {path}: {exc.strerror}", param="image_url") from exc


def _too_large(size: int, limit: int) -> str:
    return f"the image has {size} bytes, more than the limit of {limit}"
