# SPDX-License-Identifier: Apache-2.0
"""epdrt: Encode-Prefill-Decode disaggregated serving runtime for large multimodal models."""

# errors must be imported before _core: the extension maps its exceptions onto these classes.
from epdrt import _core
from epdrt._core import BlockPool
from epdrt.cache import MMTokenCache, PagedKVCache
from epdrt.errors import (
    CudaUnavailable,
    EpdrtError,
    InvalidArgument,
    PoolExhausted,
    RegionError,
)
from epdrt.region import Region

__version__: str = _core.__version__

__all__ = [
    "BlockPool",
    "CudaUnavailable",
    "EpdrtError",
    "InvalidArgument",
    "MMTokenCache",
    "PagedKVCache",
    "PoolExhausted",
    "Region",
    "RegionError",
    "__version__",
]
