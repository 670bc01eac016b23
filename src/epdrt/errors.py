# SPDX-License-Identifier: Apache-2.0
"""Exceptions raised by epdrt. Every one derives from :class:`EpdrtError`."""


class EpdrtError(Exception):
    """Base class of all epdrt errors."""


class InvalidArgument(EpdrtError, ValueError):
    """A caller passed something invalid; nothing was changed."""


class PoolExhausted(EpdrtError):
    """Too few free blocks for an allocation; nothing was allocated (back-pressure signal)."""


class CudaUnavailable(EpdrtError):
    """A CUDA feature was used without CUDA support, a driver or a device."""


class RegionError(EpdrtError, OSError):
    """A memory region could not be created or opened (owner gone, stale descriptor, OS error)."""


class TransferError(EpdrtError):
    """A transfer failed after it was submitted: copy error, peer gone, or bad peer message."""
