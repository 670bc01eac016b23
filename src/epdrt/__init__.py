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
    TransferError,
)
from epdrt.region import Region
from epdrt.transfer.engine import Transfer, TransferEngine

__version__: str = _core.__version__

# The runtime pulls in ZeroMQ and transformers: import it on first use only.
_RUNTIME_NAMES = {"EPDCluster", "EPDConfig", "Request", "RequestError", "RequestResult"}


def __getattr__(name: str) -> object:
    if name in _RUNTIME_NAMES:
        from epdrt import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'epdrt' has no attribute {name!r}")


__all__ = [
    "BlockPool",
    "CudaUnavailable",
    "EPDCluster",
    "EPDConfig",
    "EpdrtError",
    "InvalidArgument",
    "MMTokenCache",
    "PagedKVCache",
    "PoolExhausted",
    "Region",
    "RegionError",
    "Transfer",
    "TransferEngine",
    "TransferError",
    "__version__",
]
