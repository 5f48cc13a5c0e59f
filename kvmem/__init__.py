"""kvmem: fused attention kernels over a paged KV cache and an external memory bank."""

__version__ = "0.1.0"

from kvmem import backends, ops  # noqa: E402
from kvmem._ext import build_info  # noqa: E402
from kvmem.cache import BlockAllocator, KVCacheManager, LayerGroupSpec  # noqa: E402
from kvmem.errors import CacheFullError  # noqa: E402
from kvmem.ops import cache_write, merge_states, paged_attention  # noqa: E402

from kvmem.memory import MemoryConfig  # noqa: E402  (torch only)
from kvmem import nn  # noqa: E402  (torch only; never imports transformers)

__all__ = ["ops", "backends", "build_info", "BlockAllocator", "KVCacheManager", "LayerGroupSpec",
           "CacheFullError", "MemoryConfig", "cache_write", "paged_attention", "merge_states", "nn", "patch", "unpatch",
           "PagedKVCache", "model_fingerprint", "calibrate_kv_scales", "KVScales", "MemoryBank", "set_banks", "__version__"]

# The Hugging Face integration, imported on first use so that `import kvmem` never imports
# transformers.
_LAZY = {
    "patch": ("kvmem.integrations.hf", "patch"),
    "unpatch": ("kvmem.integrations.hf", "unpatch"),
    "register": ("kvmem.integrations.hf", "register"),
    "PagedKVCache": ("kvmem.integrations.hf", "PagedKVCache"),
    "model_fingerprint": ("kvmem.integrations.hf.fingerprint", "model_fingerprint"),
    "calibrate_kv_scales": ("kvmem.integrations.hf.calibrate", "calibrate_kv_scales"),
    "KVScales": ("kvmem.cache.scales", "KVScales"),
    "MemoryBank": ("kvmem.integrations.hf.banks", "MemoryBank"),
    "set_banks": ("kvmem.integrations.hf.banks", "set_banks"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvmem' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
