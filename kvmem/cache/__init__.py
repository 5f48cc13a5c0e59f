"""Host-side paged KV cache bookkeeping: block allocator, layer groups, per-step planning.

``KVCacheManager.plan(seq_ids, num_new_tokens)`` is called once per forward step; it reserves the
step's slots (allocating, copying-on-write, freeing blocks that left a sliding window) and returns a
``StepPlan`` whose per-group ``StepMetadata`` feeds ``kvmem.ops`` directly.

Also here (torch only): pool sizing (``parse_memory``, ``bytes_per_block``, ``needed_blocks``,
``size_groups``), ``KVPool`` (pools kept across caches: prefix caching), the KV dtype and float8
scales (``kv_cache_dtype``, ``KVScales``: ``kvmem.cache.scales``) and
``StaticDecodeBuffers`` (the host half of a fixed-shape decode step).
"""

from kvmem.cache.allocator import BlockAllocator, block_hashes, hash_block_tokens
from kvmem.cache.manager import KVCacheManager
from kvmem.cache.kvpool import KVPool
from kvmem.cache.scales import KVScales, kv_cache_dtype
from kvmem.cache.metadata import GroupUsage, LayerGroupSpec, StepMetadata, StepPlan, page_bytes
from kvmem.cache.sizing import bytes_per_block, needed_blocks, parse_memory, size_groups
from kvmem.cache.static import StaticDecodeBuffers
from kvmem.errors import CacheFullError

__all__ = [
    "BlockAllocator",
    "CacheFullError",
    "GroupUsage",
    "KVCacheManager",
    "KVPool",
    "KVScales",
    "kv_cache_dtype",
    "LayerGroupSpec",
    "StepMetadata",
    "StaticDecodeBuffers",
    "StepPlan",
    "bytes_per_block",
    "needed_blocks",
    "parse_memory",
    "size_groups",
    "block_hashes",
    "hash_block_tokens",
    "page_bytes",
]
