"""kvmem's entries in Hugging Face's attention, mask and generate machinery.

* ``kvmem_attention_forward`` is registered in ``AttentionInterface`` as ``"kvmem"``. With a
  ``PagedKVCache`` it writes the layer's new keys/values into the paged pools and runs
  ``kvmem.paged_attention`` over them; with any other cache (``DynamicCache``) or none
  (``use_cache=False``) it runs the same kernel over the dense keys/values it is given, viewed as
  pages (zero-copy without padding). During a static decode step
  (``PagedKVCache.static_decode_step``) it runs the kernel over the cache's fixed-shape metadata
  buffers instead: device work only, for CUDA graphs and ``torch.compile(fullgraph=True)``.
* ``kvmem_mask`` is registered in ``AttentionMaskInterface`` as ``"kvmem"``: it hands the kernels
  the 2D padding mask ``[batch, kv_len]`` (lengths), never a dense L x L mask, and refuses mask
  patterns it cannot express (chunked, packed sequences, bidirectional, custom overlays) instead
  of dropping them.
* ``install_generate_hook`` wraps ``GenerationMixin._prepare_cache_for_generation`` so that
  ``generate()`` on a model whose attention is ``"kvmem"`` creates a ``PagedKVCache`` (sized for the
  call) where it would have created a ``DynamicCache``; every other model is untouched.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from kvmem.integrations import families, hf_static
from kvmem.ops.kernel_ops import KernelOps
from kvmem.integrations.hf_cache import current_cache

__all__ = ["ATTN_NAME", "kvmem_attention_forward", "kvmem_mask", "register", "is_registered",
           "install_generate_hook", "uses_kvmem"]

ATTN_NAME = "kvmem"
_default_ops = KernelOps("auto")
_registered = False


def _as_float(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if x > 0 else None


def kvmem_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None, **kwargs):
    """HF attention-interface function backed by kvmem's paged kernels.

    Parameters
    ----------
    module: the attention module (``layer_idx``, ``is_causal`` are read)
    query: [batch, num_heads, new_tokens, head_dim] (after RoPE)
    key, value: [batch, num_kv_heads, kv_tokens, head_dim]: what ``cache.update`` returned
    attention_mask: None or the 2D padding mask [batch, >= kv_tokens] from ``kvmem_mask``
    scaling: softmax scale (default ``head_dim ** -0.5``)
    sliding_window: key j visible to the query at p iff ``j > p - sliding_window``
    softcap: attention-logit softcap (Gemma 2)
    s_aux: [num_heads] sink logits (gpt-oss)

    Returns
    -------
    ``(out, None)`` with out [batch, new_tokens, num_heads, head_dim]
    """
    if kwargs.get("output_attentions"):
        raise ValueError("kvmem: attn_implementation='kvmem' cannot return attention weights "
                         "(output_attentions=True); use attn_implementation='eager' for that")
    if dropout and module.training:
        raise ValueError(f"kvmem: attention dropout ({dropout}) is not supported; kvmem is for inference "
                         f"(call model.eval())")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise ValueError("kvmem: only causal attention is supported (this module is bidirectional)")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(f"kvmem: expected no mask or a 2D padding mask [batch, tokens], got {shape}; 4D masks "
                         f"and block masks are not supported (pass the 2D attention_mask to the model)")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"kvmem: q/k/v head dims must be equal, got "
                         f"{query.shape[-1]}/{key.shape[-1]}/{value.shape[-1]}")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    window = int(sliding_window) if sliding_window is not None else None
    softcap = _as_float(softcap)
    sinks = None
    if s_aux is not None:
        sinks = s_aux.detach().to(torch.float32).reshape(-1).contiguous()
    layer_idx = getattr(module, "layer_idx", None)
    st = hf_static.active()
    if st is not None and st.active:  # a static decode step (the mask was checked on the device before it)
        return st.attend(layer_idx, query, scale=scale, window=window, softcap=softcap, sink_logits=sinks), None
    cache = current_cache()
    if cache is not None and cache.owns(layer_idx, key):
        out = cache.attend(layer_idx, query, attention_mask, scale=scale, window=window, softcap=softcap,
                           sink_logits=sinks)
    else:
        ops = getattr(module, "_kvmem_ops", None) or _default_ops
        out = dense_attention(ops, query, key, value, attention_mask, scale=scale, window=window,
                              softcap=softcap, sink_logits=sinks)
    return out, None


def dense_attention(ops: KernelOps, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], *, scale: float, window: Optional[int],
                    softcap: Optional[float], sink_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """Causal attention over dense keys/values through the paged kernel (no cache, or a DynamicCache).

    Without padding each row's keys ``[K, Hkv, D]`` are one page (a strided view, no copy); with
    padding the keys are copied into 1-token pages and each row's block table lists its real
    tokens, so padding is never attended.

    Parameters
    ----------
    query: [B, Hq, S, D]; the queries are the last S of the K key columns
    key, value: [B, Hkv, K, D]
    attention_mask: None or [B, >= K] (right-aligned with the keys; True = real token)

    Returns
    -------
    out: [B, S, Hq, D] (0 at padding positions)
    """
    B, Hq, S, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    dev = query.device
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    if q.stride(-1) != 1:
        q = q.contiguous()
    kw = dict(scale=scale, window=window, softcap=softcap, sink_logits=sink_logits)
    if attention_mask is None:
        k_pages = key.transpose(1, 2)  # [B, K, Hkv, D]: B pages of K tokens
        v_pages = value.transpose(1, 2)
        table = torch.arange(B, dtype=torch.int32, device=dev).view(B, 1)
        seq_lens = torch.full((B,), K, dtype=torch.int32, device=dev)
        cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=dev)
        out = ops.paged_attention(q, k_pages, v_pages, table, seq_lens, cu, S, K, **kw)
        return out.view(B, S, Hq, D)
    if attention_mask.shape[1] < K or attention_mask.shape[0] != B:
        raise ValueError(f"kvmem: attention mask of shape {tuple(attention_mask.shape)} for {B} rows of {K} keys")
    mask = attention_mask[:, -K:].to(device=dev, dtype=torch.bool)
    k_pages = key.transpose(1, 2).reshape(B * K, 1, Hkv, D)
    v_pages = value.transpose(1, 2).reshape(B * K, 1, Hkv, D)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real columns first, in order
    table = (order + torch.arange(B, device=dev).view(B, 1) * K).to(torch.int32)
    seq_lens = mask.sum(1, dtype=torch.int32)
    qmask = mask[:, K - S:]
    cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(qmask.sum(1), 0)
    index = qmask.reshape(-1).nonzero().flatten()
    out = ops.paged_attention(q.index_select(0, index), k_pages, v_pages, table, seq_lens, cu, S, K, **kw)
    full = out.new_zeros(B * S, Hq, D)
    full.index_copy_(0, index, out)
    return full.view(B, S, Hq, D)


def kvmem_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
               attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """HF mask-interface function: returns the 2D padding mask (or None when there is none).

    Returns
    -------
    None, or the bool mask ``[batch, seen + new_tokens]`` (True = real token). Causal order, the
    sliding window, softcap and sinks are applied by the kernels from lengths.

    Raises
    ------
    ValueError
        for mask patterns kvmem cannot express (custom ``or``/``and`` mask functions, chunked
        attention, packed sequences, bidirectional attention).
    """
    from transformers.masking_utils import causal_mask_function

    if kwargs.get("use_vmap") or kwargs.get("allow_is_bidirectional_skip") is not None:
        what = "custom mask functions (or_mask_function / and_mask_function, e.g. bidirectional image tokens)" \
            if kwargs.get("use_vmap") else "bidirectional attention"
        raise ValueError(f"kvmem: {what} cannot run on kvmem's causal paged kernels")
    name = getattr(mask_function, "__qualname__", repr(mask_function))
    sliding = "local_size" in kwargs and name.startswith("and_masks")
    if mask_function is not None and mask_function is not causal_mask_function and not sliding:
        raise ValueError(f"kvmem: the attention mask pattern {name!r} (chunked attention, packed sequences or block "
                         f"masks) cannot run on kvmem's kernels, which run causal and sliding-window causal "
                         f"attention with padding")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"kvmem: expected a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    return attention_mask.to(torch.bool)


def uses_kvmem(model) -> bool:
    """Whether ``model``'s decoder attention is ``"kvmem"``."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    return getattr(families.text_config(config), "_attn_implementation", None) == ATTN_NAME


_OK_CACHE_IMPLEMENTATIONS = (None, "dynamic", "hybrid", "sliding_window")


def make_generate_cache(model, generation_config, model_kwargs, batch_size, max_cache_length) -> None:
    """Put a ``PagedKVCache`` sized for this ``generate()`` call into ``model_kwargs``."""
    from kvmem.integrations.hf import options_of

    impl = getattr(generation_config, "cache_implementation", None)
    if impl not in _OK_CACHE_IMPLEMENTATIONS:
        raise ValueError(f"kvmem: generate(cache_implementation={impl!r}) is not supported with "
                         f"attn_implementation='kvmem', which brings its own paged cache; drop cache_implementation")
    expand = max(getattr(generation_config, "num_beams", None) or 1,
                 getattr(generation_config, "num_return_sequences", None) or 1)
    model_kwargs[cache_kwarg(model)] = options_of(model).make_cache(
        model, max_batch_size=batch_size, max_cache_len=max_cache_length, expand=expand)


def cache_kwarg(model) -> str:
    """The name ``generate()``'s model kwargs give the cache: ``"cache"`` from transformers 5.24
    (``past_key_values`` is its deprecated alias there), ``"past_key_values"`` before."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _hooked(orig):
    @functools.wraps(orig)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (uses_kvmem(self) and model_kwargs.get("past_key_values") is None and model_kwargs.get("cache") is None
                and getattr(generation_config, "use_cache", True) is not False
                and not getattr(self.config, "is_encoder_decoder", False)):
            names = ("generation_mode", "batch_size", "max_cache_length")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            make_generate_cache(self, generation_config, model_kwargs, bound.get("batch_size"),
                                bound.get("max_cache_length"))
            return None
        return orig(self, generation_config, model_kwargs, *args, **kwargs)

    _prepare_cache_for_generation._kvmem_orig = orig
    return _prepare_cache_for_generation


def install_generate_hook() -> None:
    """Wrap ``GenerationMixin._prepare_cache_for_generation`` once (inert unless attention is kvmem)."""
    from transformers.generation.utils import GenerationMixin

    orig = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    if getattr(orig, "_kvmem_orig", None) is None:
        GenerationMixin._prepare_cache_for_generation = _hooked(orig)


def instance_generate_hook(model) -> bool:
    """For a model class that overrides ``_prepare_cache_for_generation``: wrap it on the instance.

    Returns whether an instance attribute was set.
    """
    import types

    cls_fn = type(model)._prepare_cache_for_generation
    if getattr(cls_fn, "_kvmem_orig", None) is not None:
        return False
    model._prepare_cache_for_generation = types.MethodType(_hooked(cls_fn), model)
    return True


def is_registered() -> bool:
    return _registered


def register() -> None:
    """Register ``"kvmem"`` with HF's attention and mask interfaces and hook ``generate`` (idempotent).

    After this, ``from_pretrained(..., attn_implementation="kvmem")`` and
    ``model.set_attn_implementation("kvmem")`` work, and ``generate()`` on such a model uses a
    ``PagedKVCache``.
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kvmem_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, kvmem_mask)
    install_generate_hook()
    _registered = True
