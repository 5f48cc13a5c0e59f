"""One layer's attention step over the paged KV cache: write -> evict/summarise -> select -> attend.

Every kvmem attention path runs a layer through ``run_layer``: ``kvmem.nn.PagedAttention``, the
Hugging Face cache's eager step and its static (CUDA-graph / ``torch.compile``) decode step, and
the dense fallback (no kvmem cache: the dense keys/values viewed as pages, nothing to write).

The stages
----------
``STAGES`` is the ordered tuple of stage functions; each takes the ``LayerStep`` and reads or sets
its fields:

1. ``write``: ``cache_write`` of the step's new keys/values at ``metadata.slot_mapping`` (skipped
   when ``k`` is None or the metadata has no slot mapping: the keys already are the pages);
2. ``evict``: evict or summarise what the layer holds (no-op today);
3. ``select``: choose what the attention reads beyond the pages (no-op today; the memory bank's
   selections go to ``context.selections``);
4. ``attend``: ``paged_attention`` over the pages (or shared-prefix decode, ``kvmem.ops.cascade``,
   when the step's metadata plans it), sets ``step.out``.

A later capability (the memory bank) adds or replaces stages (``run_layer(..., stages=...)``)
instead of a fifth copy of the path. The ``LayerContext`` carries what a stage needs beyond the
tensors: the layer index, the per-layer position embeddings the attention module applied (cos,
sin; recorded, not consumed yet) and the selections.

This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from kvmem.cache.metadata import StepMetadata

__all__ = ["LayerAttention", "LayerContext", "LayerStep", "STAGES", "run_layer", "write", "evict", "select",
           "attend", "tokens"]


@dataclass
class LayerAttention:
    """The attention parameters of one layer (the module's, not the step's).

    Attributes
    ----------
    scale: softmax scale
    window: sliding window (key j visible to position p iff ``j > p - window``), None = full
    softcap: attention-logit softcap, None = none
    sink_logits: [Hq] fp32 sink logits or None
    """

    scale: float
    window: Optional[int] = None
    softcap: Optional[float] = None
    sink_logits: Optional[torch.Tensor] = None


@dataclass
class LayerContext:
    """What the stages read beyond the tensors, for one layer in one step.

    Attributes
    ----------
    layer_idx: the layer (None when the caller has no layer index)
    position_embeddings: ``(cos, sin)`` the attention module applied to this step's q/k, or None
        (keys are stored after RoPE)
    selections: what a ``select`` stage chose (the memory bank's: ``kvmem.memory.stages``), or None
    memory: the layer's ``kvmem.memory.stages.LayerMemory`` (memory-bank layers), or None
    extra: stage name -> whatever a stage keeps for a later one
    """

    layer_idx: Optional[int] = None
    position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    selections: Optional[object] = None
    memory: Optional[object] = None
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class LayerStep:
    """The state one layer's stages share.

    Attributes
    ----------
    ops: a ``kvmem.ops.kernel_ops.KernelOps`` (``cache_write`` / ``paged_attention``)
    q: [T, Hq, D] the step's queries, token-major
    k, v: [T, Hkv, D] the step's new keys/values (the pools' dtype), or None (nothing to write)
    k_cache, v_cache: [num_blocks, block_size, Hkv, D] the layer's pages
    metadata: the layer group's ``StepMetadata`` (``slot_mapping`` may be None with ``k`` None)
    attention: the layer's ``LayerAttention``
    context: the ``LayerContext``
    out: [T, Hq, D], set by ``attend``
    k_scale, v_scale: fp32 0-d or [Hkv] scales of a quantised (float8) cache, or None: ``write``
        stores ``k / k_scale`` and ``attend`` reads ``code * k_scale`` (fixed for the pages' life)
    """

    ops: object
    q: torch.Tensor
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    metadata: StepMetadata
    attention: LayerAttention
    context: LayerContext
    out: Optional[torch.Tensor] = None
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None


def write(step: LayerStep) -> None:
    """Stage 1: the new keys/values into the pages."""
    if step.k is None or step.metadata.slot_mapping is None:
        return
    step.ops.cache_write(step.k, step.v, step.k_cache, step.v_cache, step.metadata.slot_mapping,
                         k_scale=step.k_scale, v_scale=step.v_scale)


def evict(step: LayerStep) -> None:
    """Stage 2: evict / summarise what the layer holds (no-op; the memory bank adds it)."""


def select(step: LayerStep) -> None:
    """Stage 3: select what the attention reads beyond the pages (no-op; the memory bank adds it)."""


def attend(step: LayerStep) -> None:
    """Stage 4: paged attention over the pages; sets ``step.out``. A step planned as shared-prefix
    (cascade) decode (``metadata.cascade``, full-attention layers only) runs
    ``kvmem.ops.cascade_decode`` instead (None from it: this backend cannot, plain decode)."""
    md, a = step.metadata, step.attention
    cascade = getattr(md, "cascade", None)
    if cascade is not None and a.window is None and step.q.shape[0] == cascade.rows:
        step.out = step.ops.cascade_decode(step.q, step.k_cache, step.v_cache, cascade, scale=a.scale,
                                           softcap=a.softcap, sink_logits=a.sink_logits, k_scale=step.k_scale,
                                           v_scale=step.v_scale)
        if step.out is not None:
            return
    step.out = step.ops.paged_attention(step.q, step.k_cache, step.v_cache, md.block_table, md.seq_lens,
                                        md.cu_seqlens_q, md.max_seqlen_q, md.max_seqlen_k, scale=a.scale,
                                        window=a.window, softcap=a.softcap, sink_logits=a.sink_logits,
                                        k_scale=step.k_scale, v_scale=step.v_scale)


#: The stages of every layer step, in order.
STAGES: Tuple[Callable[[LayerStep], None], ...] = (write, evict, select, attend)


def run_layer(ops, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], k_cache: torch.Tensor,
              v_cache: torch.Tensor, metadata: StepMetadata, attention: LayerAttention,
              context: Optional[LayerContext] = None, *,
              stages: Optional[Tuple[Callable[[LayerStep], None], ...]] = None,
              k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run one layer's step through ``stages`` (default ``STAGES``, read at each call: write ->
    evict -> select -> attend).

    Parameters
    ----------
    ops: ``KernelOps``
    q: [T, Hq, D]
    k, v: [T, Hkv, D] or None
    k_cache, v_cache: [num_blocks, block_size, Hkv, D]
    metadata: the layer group's ``StepMetadata``
    attention: the layer's ``LayerAttention``
    context: the ``LayerContext`` (default: an empty one)
    k_scale, v_scale: the pages' quantisation scales (float8 caches), or None

    Returns
    -------
    out: [T, Hq, D] in q's dtype
    """
    step = LayerStep(ops, q, k, v, k_cache, v_cache, metadata, attention,
                     context if context is not None else LayerContext(), k_scale=k_scale, v_scale=v_scale)
    for stage in STAGES if stages is None else stages:
        stage(step)
    return step.out


def tokens(x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H, S, D] -> [B*S, H, D] (token-major; a view when B == 1 or S == 1), rows ``index`` only."""
    B, H, S, D = x.shape
    t = x.transpose(1, 2).reshape(B * S, H, D)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if index is None else t.index_select(0, index)
