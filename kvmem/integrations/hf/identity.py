"""What a memory bank's keys and values depend on: ``model_identity(model)`` (JSON-serialisable).

Built from ``kvmem.integrations.hf.fingerprint``'s parts; a ``kvmem.MemoryBank`` records it and
compares it field by field (``IDENTITY``, in order) with the model it is attached to, so that an
error names the first difference.
"""

from __future__ import annotations

import json
from typing import Dict, Optional

import torch

from kvmem.integrations import families
from kvmem.integrations.hf.fingerprint import _config_digest, _weights_digest

__all__ = ["IDENTITY", "model_identity", "kvmem_version"]

#: identity fields, in the order they are compared, and how an error names each
IDENTITY = (("family", "the model family (config.model_type)"), ("class", "the model class"),
            ("num_layers", "the layer count"), ("num_kv_heads", "the KV head count"),
            ("head_dim", "the head dim"), ("dtype", "the model dtype"), ("kv_dtype", "the KV cache dtype"),
            ("keys", "the key storage (pre-RoPE: extend mode, post-RoPE: exact mode)"),
            ("rope", "the RoPE type and parameters"), ("config", "the model config"),
            ("weights", "the weights (another checkpoint or fine-tune)"))


def _rope_description(config) -> str:
    tc = families.text_config(config)
    fields = {k: getattr(tc, k, None) for k in ("rope_parameters", "rope_scaling", "rope_theta",
                                                 "partial_rotary_factor", "max_position_embeddings")}
    return json.dumps(fields, sort_keys=True, default=str)


def model_identity(model, *, kv_dtype: Optional[torch.dtype] = None, keys: str = "pre") -> Dict[str, object]:
    """What a bank's keys and values depend on (the module docstring's list), JSON-serialisable."""
    num_layers, heads, head_dim = families.kv_dims(model.config)
    tc = families.text_config(model.config)
    dtype = getattr(model, "dtype", None)
    return {"family": getattr(tc, "model_type", None), "class": type(model).__name__, "num_layers": num_layers,
            "num_kv_heads": heads, "head_dim": head_dim, "dtype": str(dtype), "kv_dtype": str(kv_dtype or dtype),
            "keys": keys, "rope": _rope_description(model.config), "config": _config_digest(model.config),
            "weights": _weights_digest(model)}


def kvmem_version() -> str:
    import kvmem

    return kvmem.__version__
