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

__all__ = ["PagedAttention", "MemoryAttention", "static_metadata", "static_memory_step"]


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


class MemoryAttention(torch.nn.Module):
    """Memory-bank attention of one layer: write the step's keys/values, summarise the blocks the
    step evicted, select each segment's top-k bank blocks, attend to sinks + selected blocks +
    local window in one softmax (``kvmem.memory.stages``; semantics ``kvmem.ops.memory_attention``).

    The caller keeps the per-step host work, once per step for every memory layer: the
    ``RowBanks`` and ``kvmem.memory.step.plan_memory_step`` (evictions, chunks, sub-block
    segments). Each layer owns a summary pool ``[num_blocks + 1, Hkv, 2, D]`` fp32
    (``MemoryAttention.summary_pool``; the last row is scratch for padded eviction lists).

    >>> attn = kvmem.nn.MemoryAttention(9, 3, 64, config=cfg.resolve(model_config, page_size=16))
    >>> banks = kvmem.memory.RowBanks(sink_blocks=cfg.sink_blocks, window=cfg.window, block_size=16)
    >>> plan = manager.plan(seq_ids, num_new_tokens)                       # once per step
    >>> mem = plan_memory_step(banks, tables, lens_before, num_new_tokens, top_k=cfg.top_k,
    ...                        chunk_size=cfg.chunk_size)                   # once per step
    >>> out = attn(q, k, v, *pools[layer], plan.for_layer(layer), mem, summaries[layer])

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim: as ``PagedAttention``
    config: a resolved ``kvmem.MemoryConfig`` (``cfg.resolve(model_config, page_size)``)
    scale, softcap: as ``PagedAttention``
    layer_idx: this layer's index (messages)
    backend: ``"auto"`` or a kvmem backend name

    Extend mode (``config.mode == "extend"``): pass ``q``/``k`` *before* RoPE and ``rope_cos_sin``
    ``[P, rot_dim]`` (cos half, sin half; ``P >= config.max_distance``): queries rotate at their
    compacted positions, keys on load at theirs. Exact mode: ``q``/``k`` as the model rotated them.
    Policies (``kvmem.memory.policies``) come with the config: ``config.selection`` runs in the
    select stage; ``config.eviction`` is the caller's, between steps
    (``policies.apply_eviction(policy, bank_table, bank_lens, page_mass)`` -> ``RowBanks.retain``).
    A policy that reads attention mass needs ``page_mass`` (``MemoryAttention.mass_pool``, shared by
    the layers), which the layer adds its ``block_mass`` to.
    For a ``torch.compile(fullgraph=True)`` decode step give fixed shapes: one segment per row,
    ``bank_width=`` and ``pad_summarise_to=`` of ``plan_memory_step``, and constant host bounds
    (``static_memory_step``).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, config, scale: Optional[float] = None,
                 softcap: Optional[float] = None, layer_idx: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        from kvmem.memory import MemoryConfig
        from kvmem.ops.kernel_ops import KernelOps

        if not isinstance(config, MemoryConfig) or not config.is_resolved:
            raise TypeError(f"MemoryAttention: config must be a resolved kvmem.MemoryConfig "
                            f"(MemoryConfig.resolve(model_config, page_size)), got {config!r}")
        PagedAttention(num_heads, num_kv_heads, head_dim)  # the same argument checks
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.config = config
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.softcap = float(softcap) if softcap else None
        self.layer_idx = layer_idx
        self._ops = KernelOps(backend)

    def summary_pool(self, num_blocks: int, device=None) -> torch.Tensor:
        """A summary pool for a page pool of ``num_blocks`` pages: ``[num_blocks + 1, Hkv, 2, D]`` fp32, NaN."""
        return torch.full((num_blocks + 1, self.num_kv_heads, 2, self.head_dim), float("nan"), dtype=torch.float32,
                          device=device)

    def mass_pool(self, num_blocks: int, device=None) -> torch.Tensor:
        """Attention mass per page for a pool of ``num_blocks`` pages: ``[num_blocks + 1]`` fp32, zeros."""
        return torch.zeros(num_blocks + 1, dtype=torch.float32, device=device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"mode={c.mode}, sinks={c.sink_tokens}, window={c.window}, top_k={c.top_k}, block={c.block_size}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, metadata: StepMetadata, memory, summaries: torch.Tensor,
                rope_cos_sin: Optional[torch.Tensor] = None,
                page_mass: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Write, summarise, select, attend.

        Parameters
        ----------
        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (the pools' dtype)
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (block_size = the bank's)
        metadata: the full-attention group's ``StepMetadata`` of the step
        memory: the step's ``kvmem.memory.step.MemoryStep``
        summaries: this layer's summary pool
        rope_cos_sin: the RoPE table (extend mode), else None
        page_mass: ``[num_blocks + 1]`` fp32 (``mass_pool``), accumulated in place, when a policy of
            the config reads attention mass (``config.needs_mass``); else None

        Returns
        -------
        out: [T, num_heads, head_dim] in q's dtype
        """
        from kvmem.memory.stages import MEMORY_STAGES, LayerMemory

        if (rope_cos_sin is None) != (self.config.mode == "exact"):
            raise ValueError(f"MemoryAttention: mode={self.config.mode!r} takes rope_cos_sin "
                             f"{'None' if self.config.mode == 'exact' else '(the RoPE table)'}")
        if k_cache.shape[1] != self.config.block_size:
            raise ValueError(f"MemoryAttention: pages of {k_cache.shape[1]} tokens, the bank's blocks are "
                             f"{self.config.block_size}")
        if (page_mass is None) == self.config.needs_mass:
            raise ValueError(f"MemoryAttention: argument 'page_mass' must be "
                             f"{'a [num_blocks + 1] fp32 tensor (mass_pool)' if self.config.needs_mass else 'None'}"
                             f" with this config's policies (needs_mass={self.config.needs_mass})")
        attention = LayerAttention(self.scale, None, self.softcap, None)
        ctx = LayerContext(self.layer_idx, memory=LayerMemory(self.config, memory, summaries, rope_cos_sin,
                                                              page_mass))
        return run_layer(self._ops, q, k, v, k_cache, v_cache, metadata, attention, ctx, stages=MEMORY_STAGES)


def static_memory_step(memory, *, max_seqlen_q: int, max_seqlen_k: int):
    """``memory`` (a ``MemoryStep``) with constant host bounds in every segment group, for a
    captured decode step (as ``static_metadata``)."""
    import dataclasses

    groups = [dataclasses.replace(g, max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))
              for g in memory.groups]
    return dataclasses.replace(memory, groups=groups)
