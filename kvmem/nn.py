"""``torch.nn`` building blocks over kvmem's ops, for custom inference code.

The caller keeps its projections, RoPE and the ``KVCacheManager``; ``PagedAttention`` is the
attention core of one layer: it writes the step's new keys/values into the layer's pools and runs
paged attention with the step's metadata.

>>> attn = kvmem.nn.PagedAttention(num_heads=9, num_kv_heads=3, head_dim=64)
>>> plan = manager.plan(seq_ids, num_new_tokens)          # once per step
>>> manager.apply_copies(pools)                            # if plan.copies
>>> out = attn(q, k, v, *pools[layer], plan.for_layer(layer))   # [T, 9, 64]

This module does not import transformers.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from kvmem.cache.metadata import StepMetadata, StepPlan
from kvmem.layer import LayerAttention, LayerContext, run_layer

__all__ = ["PagedAttention", "static_metadata"]


def static_metadata(md: StepMetadata, *, max_seqlen_q: int, max_seqlen_k: int) -> StepMetadata:
    """``md`` with constant host bounds, for a captured (``torch.compile(fullgraph=True)`` / CUDA
    graph) decode step.

    Plan with fixed shapes (``KVCacheManager(max_blocks_per_seq=W)`` or ``plan(...,
    max_blocks_per_seq=W, pad_batch_to=B, pad_tokens_to=T)``) and pass upper bounds that do not
    change between steps (e.g. ``max_seqlen_q=1``, ``max_seqlen_k=W * block_size``): the kernels
    only need bounds, and changing Python ints would recompile.
    """
    return StepMetadata(block_table=md.block_table, seq_lens=md.seq_lens, cu_seqlens_q=md.cu_seqlens_q,
                        slot_mapping=md.slot_mapping, max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k),
                        window=md.window)


class PagedAttention(torch.nn.Module):
    """Paged attention of one layer: ``cache_write`` of the new tokens, then ``paged_attention``
    (``kvmem.layer.run_layer``, the step every kvmem attention path runs).

    Parameters
    ----------
    num_heads: query heads ``Hq``
    num_kv_heads: key/value heads ``Hkv`` (``Hq % Hkv == 0``)
    head_dim: ``D``
    scale: softmax scale (default ``1/sqrt(D)``)
    window: sliding window (key j visible to position p iff ``j > p - window``); None takes the
        window of the step metadata (its layer group); it may not be wider than the group's
    softcap: attention-logit softcap (``c * tanh(s / c)``)
    sinks: learn per-head sink logits (a ``[Hq]`` fp32 parameter ``sink_logits``, gpt-oss style)
    layer_idx: this layer's index; needed when ``forward`` gets a whole ``StepPlan``
    backend: ``"auto"`` or a kvmem backend name (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``)
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, scale: Optional[float] = None,
                 window: Optional[int] = None, softcap: Optional[float] = None, sinks: bool = False,
                 layer_idx: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        from kvmem.ops.kernel_ops import KernelOps

        for name, x in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"PagedAttention: {name} must be an int >= 1, got {x!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"PagedAttention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"PagedAttention: window must be None or an int >= 1, got {window!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.window = window
        self.softcap = float(softcap) if softcap else None
        self.layer_idx = layer_idx
        self.sink_logits = torch.nn.Parameter(torch.zeros(num_heads, dtype=torch.float32)) if sinks else None
        self._ops = KernelOps(backend)

    def extra_repr(self) -> str:
        parts = [f"num_heads={self.num_heads}", f"num_kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}",
                 f"scale={self.scale:.4g}"]
        for name in ("window", "softcap", "layer_idx"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if self.sink_logits is not None:
            parts.append("sinks=True")
        return ", ".join(parts)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, metadata: Union[StepMetadata, StepPlan]) -> torch.Tensor:
        """Write ``k``/``v`` into the pools and attend.

        Parameters
        ----------
        q: [T, num_heads, head_dim], the step's new tokens in plan order (sequence after sequence)
        k, v: [T, num_kv_heads, head_dim] (after RoPE), the pools' dtype
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], this layer's pools
        metadata: the layer group's ``StepMetadata`` (``plan.for_layer(i)``), or the ``StepPlan``
            (then ``layer_idx`` picks the group)

        Returns
        -------
        out: [T, num_heads, head_dim] in q's dtype
        """
        md = metadata
        if isinstance(md, StepPlan):
            if self.layer_idx is None:
                raise ValueError("PagedAttention: pass plan.for_layer(i), or construct with layer_idx= "
                                 "to take a StepPlan")
            md = md.for_layer(self.layer_idx)
        if not isinstance(md, StepMetadata):
            raise TypeError(f"PagedAttention: metadata must be a StepMetadata or StepPlan, got {type(md).__name__}")
        if q.dim() != 3 or q.shape[1:] != (self.num_heads, self.head_dim):
            raise ValueError(f"PagedAttention: q must be [T, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or t.shape != (q.shape[0], self.num_kv_heads, self.head_dim):
                raise ValueError(f"PagedAttention: {name} must be [{q.shape[0]}, {self.num_kv_heads}, "
                                 f"{self.head_dim}], got {tuple(t.shape)}")
        if k_cache.dim() != 4 or k_cache.shape[2:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"PagedAttention: k_cache must be [num_blocks, block_size, {self.num_kv_heads}, "
                             f"{self.head_dim}], got {tuple(k_cache.shape)}")
        if md.slot_mapping.shape[0] != q.shape[0]:
            raise ValueError(f"PagedAttention: the metadata plans {md.slot_mapping.shape[0]} tokens, "
                             f"q has {q.shape[0]}")
        window = self.window if self.window is not None else md.window
        if md.window is not None and window > md.window:
            raise ValueError(f"PagedAttention: window={self.window} is wider than the window {md.window} of the "
                             f"metadata's layer group, whose older blocks are freed")
        sinks = None if self.sink_logits is None else self.sink_logits.detach().float()
        attention = LayerAttention(self.scale, window, self.softcap, sinks)
        return run_layer(self._ops, q, k, v, k_cache, v_cache, md, attention, LayerContext(self.layer_idx))
