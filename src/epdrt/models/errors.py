# SPDX-License-Identifier: Apache-2.0
"""Exceptions of the model layer. Both derive from :class:`epdrt.errors.EpdrtError`."""

from __future__ import annotations

from epdrt.errors import EpdrtError


class RequestError(EpdrtError, ValueError):
    """A request was rejected before any model work: bad or oversized image, unsupported format,
    too many images, placeholders that do not match the images, prompt longer than the context."""


class ModelLoadError(EpdrtError):
    """A model directory cannot be used: missing or inconsistent files, unknown model type,
    missing weights, or a processor that disagrees with the model."""
