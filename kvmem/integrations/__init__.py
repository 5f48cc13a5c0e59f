"""Integrations of kvmem with other libraries (imported lazily: ``import kvmem`` stays cheap).

Hugging Face transformers (the package ``kvmem.integrations.hf``): ``patch``, ``unpatch``,
``PagedKVCache``, ``DecodeGraphRunner`` (static, CUDA-graph / torch.compile decode steps),
``register`` (makes ``attn_implementation="kvmem"`` available), ``model_fingerprint``, and the
family table ``kvmem.integrations.families``.
"""

import importlib

__all__ = ["patch", "unpatch", "is_patched", "PagedKVCache", "DecodeGraphRunner", "register", "UnsupportedModelError",
           "model_fingerprint", "families"]

_LAZY = {
    "patch": ("kvmem.integrations.hf", "patch"),
    "unpatch": ("kvmem.integrations.hf", "unpatch"),
    "is_patched": ("kvmem.integrations.hf", "is_patched"),
    "register": ("kvmem.integrations.hf", "register"),
    "PagedKVCache": ("kvmem.integrations.hf", "PagedKVCache"),
    "DecodeGraphRunner": ("kvmem.integrations.hf", "DecodeGraphRunner"),
    "model_fingerprint": ("kvmem.integrations.hf.fingerprint", "model_fingerprint"),
    "UnsupportedModelError": ("kvmem.integrations.families", "UnsupportedModelError"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("families", "hf"):
        return importlib.import_module(f"kvmem.integrations.{name}")
    raise AttributeError(f"module 'kvmem.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
