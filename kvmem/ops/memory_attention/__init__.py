"""``kvmem::memory_attention``: sinks + selected bank blocks + causal window in one softmax.

Semantics: the module docstring of ``kvmem.ops.memory_attention.reference``. The op folder:
``params``, ``validate``, ``reference``, ``capabilities`` and ``paged`` (the composite every
paged backend runs: compacted tables + one ``paged_attention`` per KV head).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem import dispatch
from kvmem.ops._common import check_all
from kvmem.ops.memory_attention import capabilities, reference, validate  # noqa: F401  (capabilities registers)
from kvmem.ops.memory_attention.params import OP, MemoryAttentionParams
from kvmem.ops.paged_attention.params import default_scale

__all__ = ["memory_attention", "reference", "MemoryAttentionParams"]


@torch.library.custom_op("kvmem::memory_attention", mutates_args=("out", "lse", "block_mass"))
def _memory_attention_op(
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    block_mass: Optional[torch.Tensor],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sink_blocks: int,
    window_start: torch.Tensor,
    bank_table: torch.Tensor,
    selected: torch.Tensor,
    scale: float,
    softcap: float,
    sink_logits: Optional[torch.Tensor],
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    rope_cos_sin: Optional[torch.Tensor],
    rope_neox: bool,
) -> None:
    """Op schema (softcap <= 0 means none). Writes out (and lse, block_mass when given)."""
    params = MemoryAttentionParams.from_schema(
        out, lse, block_mass, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
        sink_blocks, window_start, bank_table, selected, scale, softcap, sink_logits, k_scale, v_scale, rope_cos_sin,
        rope_neox)
    dispatch.select(params.call()).run(OP, params)


@_memory_attention_op.register_fake
def _(out, lse, block_mass, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
      sink_blocks, window_start, bank_table, selected, scale, softcap, sink_logits, k_scale, v_scale, rope_cos_sin,
      rope_neox):
    torch._check(q.dim() == 3 and k_cache.dim() == 4 and out.dim() == 3 and selected.dim() == 3
                 and bank_table.dim() == 2, lambda: "memory_attention: q/out/selected 3-D, k_cache 4-D, bank_table 2-D")
    num_heads, num_kv_heads, batch = q.shape[1], k_cache.shape[2], seq_lens.shape[0]
    checks = [(out.shape[i], q.shape[i], f"out.shape[{i}] vs q.shape[{i}]") for i in range(3)]
    checks += [(v_cache.shape[i], k_cache.shape[i], f"v_cache.shape[{i}] vs k_cache.shape[{i}]") for i in range(4)]
    checks += [(k_cache.shape[3], q.shape[2], "k_cache head_dim vs q head_dim"),
               (num_heads % num_kv_heads, 0, "num_heads % num_kv_heads"),
               (block_table.shape[0], batch, "block_table rows vs seq_lens"),
               (cu_seqlens_q.shape[0], batch + 1, "cu_seqlens_q vs seq_lens + 1"),
               (window_start.shape[0], batch, "window_start vs seq_lens"),
               (bank_table.shape[0], batch, "bank_table rows vs seq_lens"),
               (selected.shape[0], batch, "selected rows vs seq_lens"),
               (selected.shape[1], num_kv_heads, "selected.shape[1] vs num_kv_heads")]
    if lse is not None:
        checks += [(lse.shape[i], q.shape[i], f"lse.shape[{i}] vs q.shape[{i}]") for i in range(2)]
    if block_mass is not None:
        checks += [(block_mass.shape[0], batch, "block_mass rows vs seq_lens"),
                   (block_mass.shape[1], num_kv_heads, "block_mass.shape[1] vs num_kv_heads"),
                   (block_mass.shape[2], bank_table.shape[1], "block_mass.shape[2] vs bank_table.shape[1]")]
    if sink_logits is not None:
        checks.append((sink_logits.shape[0], num_heads, "sink_logits vs num_heads"))
    check_all(checks)
    return None


def memory_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    sink_blocks: int,
    window_start: torch.Tensor,
    bank_table: torch.Tensor,
    selected: torch.Tensor,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    sink_logits: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    rope_cos_sin: Optional[torch.Tensor] = None,
    rope_neox: bool = True,
    return_lse: bool = False,
    block_mass: Optional[torch.Tensor] = None,
    check: bool = True,
):
    """Attention over the sinks, the selected bank blocks and the causal local window of each row.

    Parameters
    ----------
    q: [num_tokens, num_heads, head_dim]; with ``rope_cos_sin``, rotated at compacted positions
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (one page = one bank block)
    block_table: [batch, max_blocks] int32; only sink and window entries are read
    seq_lens: [batch] int32, KV length after this step's write
    cu_seqlens_q: [batch + 1] int32
    max_seqlen_q, max_seqlen_k: host ints, upper bounds
    sink_blocks: host int, sink pages per row (``block_table[b, :sink_blocks]``)
    window_start: [batch] int32, first block of the causal local window (``>= sink_blocks``)
    bank_table: [batch, max_bank] int32, page ids of each row's candidate bank blocks
    selected: [batch, num_kv_heads, top_k] int32, ascending positions into ``bank_table[b]``,
        -1 = empty (padding last), e.g. from ``memory_select``
    scale: default ``1/sqrt(head_dim)``; softcap, sink_logits [num_heads] fp32, k_scale, v_scale:
        as in ``paged_attention``
    rope_cos_sin: [num_positions, rot_dim] fp32: pages hold pre-RoPE keys, rotated on load at
        their compacted positions (extend mode); None: keys as cached (exact mode)
    rope_neox: rotate halves (True) or interleaved pairs (False)
    return_lse: also return ``lse: [num_tokens, num_heads]`` fp32
    block_mass: [batch, num_kv_heads, max_bank] fp32, overwritten with each bank block's
        attention mass (summed over the row's queries and the group's query heads); today only
        the reference computes it (such a call falls back to it)
    check: validate values too (one device->host sync)

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in q's dtype, or ``(out, lse)`` when ``return_lse``
    """
    scale = default_scale(q, scale)
    validate.structure(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                       sink_blocks, window_start, bank_table, selected, scale, softcap, sink_logits, k_scale,
                       v_scale, rope_cos_sin, rope_neox, return_lse, block_mass)
    if check:
        validate.values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                        sink_blocks, window_start, bank_table, selected, rope_cos_sin)
    params = MemoryAttentionParams.build(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, sink_blocks=sink_blocks,
        window_start=window_start, bank_table=bank_table, selected=selected, scale=scale, softcap=softcap,
        sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale, rope_cos_sin=rope_cos_sin, rope_neox=rope_neox,
        return_lse=return_lse, block_mass=block_mass)
    torch.ops.kvmem.memory_attention(*params.to_schema())
    return (params.out, params.lse) if return_lse else params.out

