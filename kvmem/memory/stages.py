"""The memory bank's layer stages: write -> evict (summarise) -> select -> attend.

``MEMORY_STAGES`` replaces ``kvmem.layer.STAGES`` for a memory layer (``run_layer(...,
stages=MEMORY_STAGES)``); the stages read the layer's ``LayerMemory`` from
``LayerContext.memory``. The ops are called through ``kvmem.memory.kernels`` only.

* ``write``: the step's new keys/values into the pages (extend mode: pre-RoPE keys; the caller
  un-rotates them);
* ``evict``: summarise the pages the step's evictions moved to the banks (before any selection);
* ``select``: per segment group, the config's selection policy (``kvmem.memory.policies``; the
  default: each segment's top-k bank blocks with its first query) once per group (exact: ``q`` as
  given, post-RoPE like the cached keys; extend: the pre-RoPE ``q``); an untrusted policy's output
  is checked (``validate_selected``) before any attention kernel runs; the selections go to
  ``LayerContext.selections`` as ``[(bank_table rows, selected)]`` per group;
* ``attend``: per group, memory attention; extend mode rotates ``q`` at its compacted positions
  and passes the RoPE table, so keys rotate on load at theirs. With ``LayerMemory.page_mass``
  (a policy reads attention mass) the op's ``block_mass`` is added to it by page id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvmem.layer import LayerStep, write
from kvmem.memory import kernels, policies
from kvmem.memory.config import MemoryConfig
from kvmem.memory.step import MemoryStep

__all__ = ["LayerMemory", "MEMORY_STAGES", "evict", "select", "attend"]


@dataclass
class LayerMemory:
    """What the memory stages of one layer need in one step.

    Attributes
    ----------
    config: the resolved ``MemoryConfig``
    step: the step's ``MemoryStep`` (the same for every memory layer)
    summaries: [num_pages + 1, Hkv, 2, D] fp32, this layer's summary pool (last row scratch)
    rope_cos_sin: [P, rot_dim] fp32 (extend mode: q/k given pre-RoPE), None in exact mode
    page_mass: [num_pages + 1] fp32 attention mass per page, accumulated in place over layers,
        KV heads and steps (last entry scratch), when a policy reads mass; else None
    """

    config: MemoryConfig
    step: MemoryStep
    summaries: torch.Tensor
    rope_cos_sin: Optional[torch.Tensor] = None
    page_mass: Optional[torch.Tensor] = None


def _memory(step: LayerStep) -> LayerMemory:
    mem = getattr(step.context, "memory", None)
    if not isinstance(mem, LayerMemory):
        raise ValueError(f"kvmem: layer {step.context.layer_idx} runs the memory stages without a LayerMemory "
                         f"in its LayerContext.memory")
    return mem


def evict(step: LayerStep) -> None:
    """Summarise the pages newly evicted to the banks (``MemoryStep.summarise``)."""
    mem = _memory(step)
    ids = mem.step.summarise
    if ids.numel() and mem.config.selection.summary is not None:
        kernels.summarise(mem.summaries, step.k_cache, ids, summary=mem.config.summary, k_scale=step.k_scale)


def select(step: LayerStep) -> None:
    """The selection policy per group; ``LayerContext.selections = [(bank_table rows, selected)]``."""
    mem = _memory(step)
    cfg, ms = mem.config, mem.step
    policy = cfg.selection
    chosen = []
    for g in ms.groups:
        t0, t1 = g.tokens
        bank_table = ms.bank_table.index_select(0, g.rows)
        mass = policies.bank_mass(mem.page_mass, bank_table, g.bank_lens) if policy.needs_mass else None
        selected = policy.select(step.q[t0:t1], mem.summaries, bank_table, g.bank_lens, g.query_index, cfg.top_k,
                                 scale=step.attention.scale, mass=mass)
        if policy.validate:
            selected = policies.validate_selected(policy, selected, g.bank_lens, g.query_index, cfg.top_k,
                                                  mem.summaries.shape[1])
        else:  # trusted (no checks, no host sync), but "any order" holds: the op takes them ascending
            selected = policies.sort_selected(selected)
        chosen.append((bank_table, selected))
    step.context.selections = chosen


def attend(step: LayerStep) -> None:
    """Memory attention per segment group; sets ``step.out``."""
    mem = _memory(step)
    cfg, ms, a, md = mem.config, mem.step, step.attention, step.metadata
    out = torch.empty_like(step.q, memory_format=torch.contiguous_format)
    for g, (bank_table, selected) in zip(ms.groups, step.context.selections):
        t0, t1 = g.tokens
        q = step.q[t0:t1]
        if mem.rope_cos_sin is not None:
            q = kernels.rotate(q, mem.rope_cos_sin, g.positions)
        mass = None
        if mem.page_mass is not None:
            mass = torch.empty(selected.shape[0], selected.shape[1], bank_table.shape[1], dtype=torch.float32,
                               device=q.device)
        kernels.attend(q, step.k_cache, step.v_cache, md.block_table.index_select(0, g.rows), g.seq_lens,
                       g.cu_seqlens_q, g.max_seqlen_q, g.max_seqlen_k, sink_blocks=cfg.sink_blocks,
                       window_start=g.window_start, bank_table=bank_table, selected=selected, scale=a.scale,
                       softcap=a.softcap, sink_logits=a.sink_logits, rope_cos_sin=mem.rope_cos_sin, out=out[t0:t1],
                       k_scale=step.k_scale, v_scale=step.v_scale, block_mass=mass)
        if mass is not None:
            policies.add_block_mass(mem.page_mass, bank_table, mass)
    step.out = out


#: The stages of a memory layer, in order.
MEMORY_STAGES = (write, evict, select, attend)
