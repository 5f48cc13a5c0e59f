"""The one seam between the memory bank's stages and its ops: ``summarise``, ``select``, ``attend``.

Every caller of the memory ops (``kvmem.memory.stages``: the HF integration and
``kvmem.nn.MemoryAttention``) goes through these three functions, so that switching them to
registered custom ops / other backends is a change of this file only. None of them validates
values or syncs with the host (the step tables are built valid on the host,
``kvmem.memory.step``):

* ``summarise``: block summaries into the summary pool (``memory_select.reference``);
* ``select``: batched top-k selection (``memory_select.batched``, equal to the reference as sets);
* ``attend``: memory attention on the paged kernels over compacted tables
  (``memory_attention.paged``, equal to the reference). With a RoPE table (extend mode) the paged
  kernels rotate each key on load at its compacted position (slot ``j`` of a compacted table is
  position ``j``): RoPE on load in the C++ CPU, Triton and CUDA ``paged_attention``, no copy;
* ``rotate``: RoPE of queries at their compacted positions (``kvmem.ops.reference.apply_rotary``).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem.ops.memory_attention import paged as _paged_attention
from kvmem.ops.memory_select import batched as _batched_select
from kvmem.ops.memory_select import reference as _select_reference
from kvmem.ops.reference import apply_rotary as _apply_rotary

__all__ = ["summarise", "select", "block_scores", "attend", "rotate"]


def summarise(summaries: torch.Tensor, k_cache: torch.Tensor, page_ids: torch.Tensor, *, summary: str = "minmax",
              k_scale: Optional[torch.Tensor] = None) -> None:
    """``summaries[page_ids] = summaries of those pages`` in place.

    summaries: [num_pages + 1, Hkv, 2, D]: the last row is scratch (``page_ids`` entries ``-1`` write
    there, so a fixed-size, padded id list is a static shape); page_ids: [E] int64
    """
    _select_reference.write_summaries(summaries, k_cache, page_ids, summary=summary, k_scale=k_scale)


def select(q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor, bank_lens: torch.Tensor,
           query_index: torch.Tensor, top_k: int, *, summary: str = "minmax",
           scale: Optional[float] = None) -> torch.Tensor:
    """``selected: [batch, Hkv, top_k]`` int32 positions into ``bank_table`` (``memory_select``)."""
    return _batched_select.memory_select(q, summaries, bank_table, bank_lens, query_index, top_k, scale=scale,
                                         summary=summary)


def block_scores(q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor, bank_lens: torch.Tensor,
                 query_index: torch.Tensor, *, summary: str = "minmax", scale: Optional[float] = None) -> torch.Tensor:
    """``[batch, Hkv, max_bank]`` fp32 selection scores (the group rule; ``memory_select.batched``)."""
    return _batched_select.block_scores(q, summaries, bank_table, bank_lens, query_index, scale=scale, summary=summary)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
           sink_blocks: int, window_start: torch.Tensor, bank_table: torch.Tensor, selected: torch.Tensor,
           scale: float, softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
           rope_cos_sin: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
           k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
           block_mass: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Memory attention (``kvmem.ops.memory_attention``'s semantics), ``out: [T, Hq, D]``;
    ``k_scale``/``v_scale``: the pages' dequantisation scales (float8 caches) or None;
    ``lse: [T, Hq]`` fp32 written when given.

    ``block_mass: [batch, Hkv, max_bank]`` fp32 (a policy that reads attention mass): overwritten
    with each bank block's mass, from the paged kernels' ``lse`` (``paged.selected_block_mass``:
    torch ops, no host sync)."""
    if block_mass is not None:
        if lse is None:  # the mass needs it; a caller's own lse is written as documented
            lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        out = attend(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                     sink_blocks=sink_blocks, window_start=window_start, bank_table=bank_table, selected=selected,
                     scale=scale, softcap=softcap, sink_logits=sink_logits, rope_cos_sin=rope_cos_sin, out=out,
                     k_scale=k_scale, v_scale=v_scale, lse=lse)
        _paged_attention.selected_block_mass(q, k_cache, bank_table, selected, cu_seqlens_q, max_seqlen_q, lse,
                                             sink_blocks=sink_blocks, scale=scale, softcap=softcap, k_scale=k_scale,
                                             rope_cos_sin=rope_cos_sin, block_mass=block_mass)
        return out
    return _paged_attention.memory_attention(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
        sink_blocks=sink_blocks, window_start=window_start, bank_table=bank_table, selected=selected, scale=scale,
        softcap=softcap, sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale, rope_cos_sin=rope_cos_sin,
        rope_neox=True, out=out, lse=lse)


def rotate(x: torch.Tensor, rope_cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x: [T, H, D]`` rotated (neox halves) at ``positions: [T]`` from the table ``[P, rot_dim]``
    (cos half, sin half); fp32 math, result in ``x``'s dtype."""
    return _apply_rotary(x.float(), rope_cos_sin, positions).to(x.dtype)

