# SPDX-License-Identifier: Apache-2.0
"""Paged caches built on a BlockPool (bookkeeping) and a Region (memory)."""

from epdrt.cache.kv_cache import PagedKVCache
from epdrt.cache.mm_cache import MMEntry, MMTokenCache

__all__ = ["MMEntry", "MMTokenCache", "PagedKVCache"]
