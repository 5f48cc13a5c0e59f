"""``kvmem.model_fingerprint(model)``: one stable digest of everything KV state depends on.

Anything kvmem keeps that must never be reused across models (cached prefix blocks today; saved
memory banks and quantisation scales next) is keyed by this digest. It covers

* the config: ``config.to_dict()`` without the fields that do not change what a layer computes
  (``VOLATILE_CONFIG_KEYS``: the attention implementation, the transformers version, the path the
  model was loaded from, output flags...);
* the model's dtype, the KV cache dtype and its quantisation scales (None: not quantised) and
  whether keys are stored before or after RoPE (``"post"``: kvmem stores keys after RoPE);
* the weights: for each parameter and buffer (adapters such as PEFT's LoRA modules are parameters
  too), its name, shape and dtype and a cheap content digest: the float64 sum and a strided sample
  of 64 elements. One changed weight changes the digest; recomputing it reads every weight once,
  so the weight part is cached per model and recomputed only when a tensor was replaced or
  modified in place (its storage pointer or torch's version counter changed).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Optional

import torch

from kvmem.integrations.hf.tp import local_tensor

__all__ = ["model_fingerprint", "VOLATILE_CONFIG_KEYS"]

#: config keys that do not change the KV a model writes
VOLATILE_CONFIG_KEYS = frozenset({
    "_attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset", "attn_implementation",
    "_experts_implementation", "transformers_version", "_name_or_path", "name_or_path", "_commit_hash",
    "torch_dtype", "dtype", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "_output_attentions", "chunk_size_feed_forward", "tie_word_embeddings_in_config",
})

_SAMPLE = 64
_weights_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (key, digest)


def _clean(d):
    if isinstance(d, dict):
        return {str(k): _clean(v) for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    return d


def _config_digest(config) -> str:
    if config is None:
        return "none"
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    text = json.dumps(_clean(d), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensors(model):
    seen = set()
    for prefix, items in (("p:", model.named_parameters()), ("b:", model.named_buffers())):
        for name, t in items:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield prefix + name, local_tensor(t)  # a DTensor: this rank's shard (no collective)


def _weights_digest(model) -> str:
    tensors = list(_tensors(model))
    key = tuple((n, t.data_ptr() if t.device.type != "meta" else 0, t._version, tuple(t.shape), str(t.dtype))
                for n, t in tensors)
    hit = _weights_cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    stats = []
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            try:
                total = flat.sum(dtype=torch.float64)
                sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].to(torch.float64)
            except (RuntimeError, TypeError):  # a dtype without sums (fp8, complex): its bytes
                flat = flat.contiguous().view(torch.uint8)
                total = flat.sum(dtype=torch.float64)
                sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].to(torch.float64)
            stats.append(torch.cat([total.reshape(1), sample]).to("cpu"))
    for s in stats:
        h.update(s.numpy().tobytes())
    digest = h.hexdigest()
    try:
        _weights_cache[model] = (key, digest)
    except TypeError:
        pass
    return digest


def model_fingerprint(model, *, kv_dtype: Optional[torch.dtype] = None, kv_scales=None,
                      keys: str = "post") -> str:
    """A stable hex digest of what a model's KV state depends on (see the module docstring).

    Parameters
    ----------
    model: a ``torch.nn.Module`` (a transformers model: its ``config`` is read)
    kv_dtype: the KV cache's dtype (default: the model's dtype)
    kv_scales: the KV cache's quantisation scales (None: not quantised); tensors, floats or a
        mapping/sequence of them
    keys: ``"post"`` (keys stored after RoPE, kvmem's layout) or ``"pre"``

    Returns
    -------
    64 hex characters; equal for the same config, dtypes and weights, different when any differs
    """
    if keys not in ("pre", "post"):
        raise ValueError(f"kvmem.model_fingerprint: keys must be 'pre' or 'post' (RoPE), got {keys!r}")
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        p = next(model.parameters(), None)
        dtype = None if p is None else p.dtype
    h = hashlib.sha256(b"kvmem-fingerprint-1|")
    h.update(f"{type(model).__name__}|{dtype}|{kv_dtype or dtype}|rope:{keys}|".encode())
    h.update(_config_digest(getattr(model, "config", None)).encode())
    h.update(_scales_digest(kv_scales).encode())
    h.update(_weights_digest(model).encode())
    return h.hexdigest()


def _scales_digest(scales) -> str:
    if scales is None:
        return "scales:none"
    if isinstance(scales, torch.Tensor):
        return "t:" + hashlib.sha256(scales.detach().to("cpu", torch.float64).numpy().tobytes()).hexdigest()
    if isinstance(scales, dict):
        return "d:" + "|".join(f"{k}={_scales_digest(v)}" for k, v in sorted(scales.items(), key=lambda kv: str(kv[0])))
    if isinstance(scales, (list, tuple)):
        return "l:" + "|".join(_scales_digest(v) for v in scales)
    if isinstance(scales, str):  # a rule's name (the default float8 scale rule)
        return "s:" + scales
    return f"f:{float(scales)!r}"
