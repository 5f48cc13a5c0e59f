"""``memory_select`` and block summaries: which bank blocks each (row, KV head) attends to.

Semantics: the module docstring of ``kvmem.ops.memory_select.reference``. Today these entry points
validate and run the reference (no custom op or compiled backend is registered yet).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem.ops.memory_select import reference, validate
from kvmem.ops.memory_select.reference import SUMMARY_KINDS, block_scores

__all__ = ["memory_select", "compute_summaries", "write_summaries", "block_scores", "SUMMARY_KINDS", "reference"]


def memory_select(
    q: torch.Tensor,
    summaries: torch.Tensor,
    bank_table: torch.Tensor,
    bank_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    top_k: int,
    *,
    scale: Optional[float] = None,
    query_index: Optional[torch.Tensor] = None,
    summary: str = "minmax",
    check: bool = True,
) -> torch.Tensor:
    """Select each (row, KV head)'s ``top_k`` bank blocks by their summaries' scores.

    Parameters
    ----------
    q: [num_tokens, num_heads, head_dim] (pre-RoPE in extend mode, like the summarised keys)
    summaries: [num_blocks, num_kv_heads, 2, head_dim], fp32 or the cache's dtype, by page id
    bank_table: [batch, max_bank] int32, page ids of each row's candidate blocks
    bank_lens: [batch] int32, valid entries of each bank_table row
    cu_seqlens_q: [batch + 1] int32
    top_k: host int >= 0 (fixed: static output shape)
    scale: score scale, default ``1/sqrt(head_dim)`` (a positive factor: the order does not change)
    query_index: [batch] int32, the token of q each row selects with (default its segment's first;
        -1: select nothing)
    summary: how ``summaries`` were made: ``"minmax"`` or ``"box"``
    check: validate values too (one device->host sync)

    Returns
    -------
    selected: [batch, num_kv_heads, top_k] int32, ascending positions into ``bank_table[b]``, -1 padded
    """
    validate.select_structure(q, summaries, bank_table, bank_lens, cu_seqlens_q, top_k, scale, query_index, summary)
    if check:
        validate.select_values(q, summaries, bank_table, bank_lens, cu_seqlens_q, query_index)
    return reference.memory_select(q, summaries, bank_table, bank_lens, cu_seqlens_q, top_k, scale=scale,
                                   query_index=query_index, summary=summary)


def compute_summaries(
    k_cache: torch.Tensor, page_ids: torch.Tensor, *, summary: str = "minmax",
    k_scale: Optional[torch.Tensor] = None, check: bool = True,
) -> torch.Tensor:
    """``[N, num_kv_heads, 2, head_dim]`` fp32 summaries of the full pages ``page_ids: [N]``.

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]; k_scale: fp32 0-d or [num_kv_heads]
    """
    validate.summaries_structure("compute_summaries", k_cache, page_ids, summary, k_scale)
    if check:
        validate.page_ids_values("compute_summaries", k_cache, page_ids)
    return reference.compute_summaries(k_cache, page_ids, summary=summary, k_scale=k_scale)


def write_summaries(
    summaries: torch.Tensor, k_cache: torch.Tensor, page_ids: torch.Tensor, *, summary: str = "minmax",
    k_scale: Optional[torch.Tensor] = None, check: bool = True,
) -> None:
    """Summarise the pages ``page_ids: [N]`` into the summary pool ``summaries: [num_blocks, Hkv, 2, D]``
    in place (at eviction, between steps)."""
    validate.summaries_structure("write_summaries", k_cache, page_ids, summary, k_scale, summaries)
    if check:
        validate.page_ids_values("write_summaries", k_cache, page_ids)
    reference.write_summaries(summaries, k_cache, page_ids, summary=summary, k_scale=k_scale)
