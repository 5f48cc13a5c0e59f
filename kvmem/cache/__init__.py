"""Host-side paged KV cache bookkeeping: block allocator, layer groups, per-step planning.

``KVCacheManager.plan(seq_ids, num_new_tokens)`` is called once per forward step; it reserves the
step's slots (allocating, copying-on-write, freeing blocks that left a sliding window) and returns a
``StepPlan`` whose per-group ``StepMetadata`` feeds ``kvmem.ops`` directly.
"""

from kvmem.cache.allocator import BlockAllocator, block_hashes, hash_block_tokens
from kvmem.cache.manager import KVCacheManager
from kvmem.cache.metadata import GroupUsage, LayerGroupSpec, StepMetadata, StepPlan, page_bytes
from kvmem.errors import CacheFullError

__all__ = [
    "BlockAllocator",
    "CacheFullError",
    "GroupUsage",
    "KVCacheManager",
    "LayerGroupSpec",
    "StepMetadata",
    "StepPlan",
    "block_hashes",
    "hash_block_tokens",
    "page_bytes",
]
