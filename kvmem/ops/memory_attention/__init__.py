"""``memory_attention``: sinks + selected bank blocks + causal window in one softmax.

Semantics: the module docstring of ``kvmem.ops.memory_attention.reference``. Today this entry
point validates and runs the reference (no custom op or compiled backend is registered yet).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kvmem.ops.memory_attention import reference, validate

__all__ = ["memory_attention", "reference"]


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
        attention mass (summed over the row's queries and the group's query heads)
    check: validate values too (one device->host sync)

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in q's dtype, or ``(out, lse)`` when ``return_lse``
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 3:
        scale = 1.0 / math.sqrt(q.shape[-1])
    validate.structure(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                       sink_blocks, window_start, bank_table, selected, scale, softcap, sink_logits, k_scale,
                       v_scale, rope_cos_sin, rope_neox, return_lse, block_mass)
    if check:
        validate.values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                        sink_blocks, window_start, bank_table, selected, rope_cos_sin)
    out, lse = reference.memory_attention(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
        sink_blocks=sink_blocks, window_start=window_start, bank_table=bank_table, selected=selected,
        scale=float(scale), softcap=softcap, sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale,
        rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, block_mass=block_mass)
    return (out, lse) if return_lse else out
