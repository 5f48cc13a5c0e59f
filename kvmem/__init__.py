"""kvmem: fused attention kernels over a paged KV cache and an external memory bank."""

__version__ = "0.1.0"

from kvmem import backends, ops  # noqa: E402
from kvmem._ext import build_info  # noqa: E402
from kvmem.cache import BlockAllocator, KVCacheManager, LayerGroupSpec  # noqa: E402
from kvmem.errors import CacheFullError  # noqa: E402
from kvmem.ops import cache_write, merge_states, paged_attention  # noqa: E402

__all__ = ["ops", "backends", "build_info", "BlockAllocator", "KVCacheManager", "LayerGroupSpec",
           "CacheFullError", "cache_write", "paged_attention", "merge_states", "__version__"]
