"""kvmem's attention and mask functions for Hugging Face's attention interfaces.

* ``kvmem_attention_forward`` (registered as ``"kvmem"``): with a ``PagedKVCache`` step in flight
  it takes the layer's stashed keys/values from the step context and the cache writes them into
  the paged pools and attends; during a static decode step it runs the layer step over the
  cache's fixed-shape buffers (device work only, for CUDA graphs and
  ``torch.compile(fullgraph=True)``); with any other cache (``DynamicCache``) or none
  (``use_cache=False``) it runs the same layer step over the dense keys/values it is given, viewed
  as pages (zero-copy without padding). All three are ``kvmem.layer.run_layer``.
* ``kvmem_mask`` (registered as ``"kvmem"`` in ``AttentionMaskInterface``): it hands the kernels
  the 2D padding mask ``[batch, kv_len]`` (lengths), never a dense L x L mask, and refuses mask
  patterns it cannot express (chunked, packed sequences, bidirectional, custom overlays) instead
  of dropping them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kvmem.cache.metadata import StepMetadata
from kvmem.integrations import families
from kvmem.integrations.hf import compat, context
from kvmem.integrations.hf.tp import rank_sink_logits
from kvmem.layer import LayerAttention, run_layer, tokens
from kvmem.ops.kernel_ops import KernelOps

__all__ = ["ATTN_NAME", "kvmem_attention_forward", "dense_attention", "kvmem_mask", "uses_kvmem"]

ATTN_NAME = "kvmem"
_default_ops = KernelOps("auto")


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
    s_aux: [num_heads] sink logits (gpt-oss); under tensor parallelism this rank's heads' (``tp.rank_sink_logits``)

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
        sinks = rank_sink_logits(s_aux, query.shape[1]).detach().to(torch.float32).reshape(-1).contiguous()
    layer_idx = getattr(module, "layer_idx", None)
    attention = LayerAttention(scale, window, softcap, sinks)
    step = context.current()
    if step is not None:
        st = step.static
        if st is not None and st.active:  # a static decode step (the mask was checked on the device before it)
            return step.run_static(layer_idx, query, key, value, attention), None
        if step.take(layer_idx, key):  # the keys a PagedKVCache's update() just stashed
            return step.cache.attend_layer(step, layer_idx, query, attention_mask, attention), None
    ops = getattr(module, "_kvmem_ops", None) or _default_ops
    return dense_attention(ops, query, key, value, attention_mask, attention), None


def dense_attention(ops: KernelOps, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], attention: LayerAttention) -> torch.Tensor:
    """Causal attention over dense keys/values through the layer step (no cache, or a DynamicCache):
    ``kvmem.layer.run_layer`` with nothing to write.

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
    q = tokens(query)
    if attention_mask is None:
        k_pages = key.transpose(1, 2)  # [B, K, Hkv, D]: B pages of K tokens
        v_pages = value.transpose(1, 2)
        table = torch.arange(B, dtype=torch.int32, device=dev).view(B, 1)
        seq_lens = torch.full((B,), K, dtype=torch.int32, device=dev)
        cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=dev)
        md = StepMetadata(table, seq_lens, cu, None, S, K, attention.window)
        out = run_layer(ops, q, None, None, k_pages, v_pages, md, attention)
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
    md = StepMetadata(table, seq_lens, cu, None, S, K, attention.window)
    out = run_layer(ops, q.index_select(0, index), None, None, k_pages, v_pages, md, attention)
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
    causal_mask_function = compat.causal_mask_function()

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
