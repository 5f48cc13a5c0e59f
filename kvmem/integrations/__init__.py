"""Integrations of kvmem with other libraries (imported lazily: ``import kvmem`` stays cheap).

Hugging Face transformers (``kvmem.integrations.hf``): ``patch``, ``unpatch``, ``PagedKVCache``,
``DecodeGraphRunner`` (static, CUDA-graph / torch.compile decode steps), ``register`` (makes ``attn_implementation="kvmem"`` available), and the family table
``kvmem.integrations.families``.
"""

import importlib

__all__ = ["patch", "unpatch", "is_patched", "PagedKVCache", "DecodeGraphRunner", "register", "UnsupportedModelError",
           "families"]

_LAZY = {
    "patch": ("kvmem.integrations.hf", "patch"),
    "unpatch": ("kvmem.integrations.hf", "unpatch"),
    "is_patched": ("kvmem.integrations.hf", "is_patched"),
    "register": ("kvmem.integrations.hf", "register"),
    "PagedKVCache": ("kvmem.integrations.hf_cache", "PagedKVCache"),
    "DecodeGraphRunner": ("kvmem.integrations.hf_graphs", "DecodeGraphRunner"),
    "UnsupportedModelError": ("kvmem.integrations.families", "UnsupportedModelError"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("families", "hf", "hf_cache", "hf_attention", "hf_static", "hf_graphs"):
        return importlib.import_module(f"kvmem.integrations.{name}")
    raise AttributeError(f"module 'kvmem.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
