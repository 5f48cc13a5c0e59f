"""Every transformers-version difference kvmem meets, in one place.

* the cache's name: ``cache=`` from transformers 5.24 (``past_key_values`` is its deprecated alias
  there and logs a warning on each use), ``past_key_values=`` before: ``cache_kwarg``,
  ``kwargs_cache``, ``output_cache``, ``CACHE_KWARGS``;
* ``Cache`` / ``CacheLayerMixin`` (``transformers.cache_utils``);
* the attention and mask interfaces, ``causal_mask_function``, ``GenerationMixin``,
  ``PreTrainedModel``, ``CausalLMOutputWithPast`` (imported where used, so that importing this
  module costs transformers' ``cache_utils`` only).
"""

from __future__ import annotations

import inspect
from typing import Optional

from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["Cache", "CacheLayerMixin", "CACHE_KWARGS", "cache_kwarg", "kwargs_cache", "output_cache",
           "causal_lm_output", "register_interfaces", "causal_mask_function", "generation_mixin",
           "pretrained_model_class"]

#: the keyword names a model forward / generate() may give the cache (new name first)
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes the cache by: ``"cache"`` from transformers 5.24
    (``past_key_values`` is its deprecated alias there), ``"past_key_values"`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def kwargs_cache(kwargs) -> Optional[object]:
    """The cache in a forward's / ``generate()``'s keyword arguments under either name, or None."""
    for name in CACHE_KWARGS:
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def output_cache(out) -> Optional[object]:
    """The cache of a model output (``out.cache``, or ``out.past_key_values`` before 5.24)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    if "cache" in keys or hasattr(type(out), "cache"):
        return getattr(out, "cache", None)
    return getattr(out, "past_key_values", None)


def causal_lm_output(logits, cache_name: str, cache):
    """A ``CausalLMOutputWithPast`` holding ``logits`` and ``cache`` (under ``cache_name``, ``cache_kwarg``'s)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=logits, **{cache_name: cache})


def register_interfaces(name: str, attention_fn, mask_fn) -> None:
    """Register ``name`` in HF's attention and attention-mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def causal_mask_function():
    from transformers.masking_utils import causal_mask_function as fn

    return fn


def generation_mixin():
    from transformers.generation.utils import GenerationMixin

    return GenerationMixin


def pretrained_model_class():
    from transformers import PreTrainedModel

    return PreTrainedModel
