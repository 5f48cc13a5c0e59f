"""The one seam between the memory bank's stages and its ops: ``summarise``, ``select``, ``attend``.

Every caller of the memory ops (``kvmem.memory.stages``: the HF integration and
``kvmem.nn.MemoryAttention``) goes through these three functions, so that switching them to
registered custom ops / other backends is a change of this file only. None of them validates
values or syncs with the host (the step tables are built valid on the host,
``kvmem.memory.step``):

* ``summarise``: block summaries into the summary pool (``memory_select.reference``);
* ``select``: batched top-k selection (``memory_select.batched``, equal to the reference as sets);
* ``attend``: memory attention on the paged kernels over compacted tables
  (``memory_attention.paged``, equal to the reference). With a RoPE table (extend mode) the keys
  of each compacted table are gathered and rotated at their compacted positions into a scratch
  pool first, and the paged kernel runs without RoPE on load: the compiled CPU and CUDA kernels
  do not rotate on load yet (their dispatcher would fall back to the slow reference), and the
  workspace is one group's tables (``chunk x (sinks + top_k + window + chunk)`` keys per KV head);
* ``rotate``: RoPE of queries at their compacted positions (``kvmem.ops.reference.apply_rotary``).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem.ops.memory_attention import paged as _paged_attention
from kvmem.ops.memory_select import batched as _batched_select
from kvmem.ops.memory_select import reference as _select_reference
from kvmem.ops.reference import apply_rotary as _apply_rotary

__all__ = ["summarise", "select", "attend", "rotate"]


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


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
           sink_blocks: int, window_start: torch.Tensor, bank_table: torch.Tensor, selected: torch.Tensor,
           scale: float, softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
           rope_cos_sin: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Memory attention (``kvmem.ops.memory_attention``'s semantics), ``out: [T, Hq, D]``."""
    if rope_cos_sin is not None:
        return _attend_rotated(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                               sink_blocks, window_start, bank_table, selected, scale, softcap, sink_logits,
                               rope_cos_sin, out)
    return _paged_attention.memory_attention(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
        sink_blocks=sink_blocks, window_start=window_start, bank_table=bank_table, selected=selected, scale=scale,
        softcap=softcap, sink_logits=sink_logits, rope_cos_sin=rope_cos_sin, rope_neox=True, out=out)


def rotate(x: torch.Tensor, rope_cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x: [T, H, D]`` rotated (neox halves) at ``positions: [T]`` from the table ``[P, rot_dim]``
    (cos half, sin half); fp32 math, result in ``x``'s dtype."""
    return _apply_rotary(x.float(), rope_cos_sin, positions).to(x.dtype)


def _attend_rotated(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, sink_blocks,
                    window_start, bank_table, selected, scale, softcap, sink_logits, rope_cos_sin, out):
    """Extend mode: rotate each (row, KV head)'s compacted keys at their positions into a scratch pool
    (slot ``j`` of a compacted table is position ``j``), then plain paged attention over it."""
    from kvmem.ops import paged_attention

    batch = block_table.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    window_blocks = max(1, min(block_table.shape[1], -(-max_seqlen_k // block_size)) - sink_blocks)
    tables, lens = _paged_attention.compacted_tables(block_table, seq_lens, window_start, bank_table, selected,
                                                     sink_blocks, block_size, window_blocks)
    width = tables.shape[2]
    positions = torch.arange(width * block_size, device=q.device).clamp(max=rope_cos_sin.shape[0] - 1)
    cos, sin = rope_cos_sin.index_select(0, positions).float().chunk(2, dim=-1)  # [width * bs, rot/2], every row
    pages = torch.arange(batch * width, dtype=torch.int32, device=q.device).view(batch, width)
    max_k = min(max_seqlen_k, width * block_size)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for h in range(num_kv_heads):
        ids = tables[h].reshape(-1).long().clamp(min=0)  # entries past a table's length are never read
        k = _rotate_rows(k_cache[:, :, h].index_select(0, ids).view(batch, width * block_size, head_dim), cos, sin)
        v = v_cache[:, :, h].index_select(0, ids)
        heads = slice(h * group, (h + 1) * group)
        paged_attention(q[:, heads], k.view(-1, block_size, 1, head_dim), v.view(-1, block_size, 1, head_dim),
                        pages, lens[h], cu_seqlens_q, max_seqlen_q, max_k, scale=scale, causal=True, softcap=softcap,
                        sink_logits=None if sink_logits is None else sink_logits[heads], out=out[:, heads],
                        check=False)
    return out


def _rotate_rows(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (neox halves) of ``k: [B, P, D]`` at positions ``0 .. P-1`` of every row, in place of
    ``apply_rotary`` (no per-key gather of the table, no concatenation); ``cos``/``sin`` ``[P, rot/2]``."""
    half = cos.shape[-1]
    x = k.float() if k.dtype != torch.float32 else k.clone()
    x1, x2 = x[..., :half].clone(), x[..., half:2 * half]
    x[..., :half].mul_(cos).addcmul_(x2, sin, value=-1.0)
    x2.mul_(cos).addcmul_(x1, sin)
    return x.to(k.dtype)
