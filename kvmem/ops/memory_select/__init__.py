"""``kvmem::memory_select`` and block summaries: which bank blocks each (row, KV head) attends to.

Semantics: the module docstring of ``kvmem.ops.memory_select.reference``. The op folder:
``params``, ``validate``, ``reference``, ``capabilities``, ``triton`` (the block-score kernel).
The summary functions (``compute_summaries``, ``write_summaries``; between steps, at eviction)
validate and run the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem import dispatch
from kvmem.ops._common import check_all
from kvmem.ops.memory_select import capabilities, reference, validate  # noqa: F401  (capabilities registers)
from kvmem.ops.memory_select.params import OP, MemorySelectParams
from kvmem.ops.memory_select.reference import SUMMARY_KINDS, block_scores

__all__ = ["memory_select", "compute_summaries", "write_summaries", "block_scores", "SUMMARY_KINDS", "reference",
           "MemorySelectParams"]


@torch.library.custom_op("kvmem::memory_select", mutates_args=("selected",))
def _memory_select_op(selected: torch.Tensor, q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor,
                      bank_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                      query_index: Optional[torch.Tensor] = None, summary: str = "minmax") -> None:
    """Op schema. Writes selected [batch, num_kv_heads, top_k]."""
    params = MemorySelectParams.from_schema(selected, q, summaries, bank_table, bank_lens, cu_seqlens_q, scale,
                                            query_index, summary)
    dispatch.select(params.call()).run(OP, params)


@_memory_select_op.register_fake
def _(selected, q, summaries, bank_table, bank_lens, cu_seqlens_q, scale, query_index=None, summary="minmax"):
    torch._check(q.dim() == 3 and summaries.dim() == 4 and selected.dim() == 3 and bank_table.dim() == 2,
                 lambda: "memory_select: q 3-D, summaries 4-D, selected 3-D, bank_table 2-D")
    batch = bank_table.shape[0]
    checks = [(selected.shape[0], batch, "selected rows vs bank_table rows"),
              (selected.shape[1], summaries.shape[1], "selected.shape[1] vs summaries' num_kv_heads"),
              (summaries.shape[2], 2, "summaries.shape[2] vs 2"),
              (summaries.shape[3], q.shape[2], "summaries head_dim vs q head_dim"),
              (q.shape[1] % summaries.shape[1], 0, "num_heads % num_kv_heads"),
              (bank_lens.shape[0], batch, "bank_lens vs bank_table rows"),
              (cu_seqlens_q.shape[0], batch + 1, "cu_seqlens_q vs bank_table rows + 1")]
    if query_index is not None:
        checks.append((query_index.shape[0], batch, "query_index vs bank_table rows"))
    check_all(checks)
    return None


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
    summary: how ``summaries`` were made: ``"minmax"``, ``"box"``, ``"reps"`` or ``"mean"`` (``SUMMARY_KINDS``)
    check: validate values too (one device->host sync)

    Returns
    -------
    selected: [batch, num_kv_heads, top_k] int32, ascending positions into ``bank_table[b]``, -1 padded
    """
    validate.select_structure(q, summaries, bank_table, bank_lens, cu_seqlens_q, top_k, scale, query_index, summary)
    if check:
        validate.select_values(q, summaries, bank_table, bank_lens, cu_seqlens_q, query_index)
    params = MemorySelectParams.build(q, summaries, bank_table, bank_lens, cu_seqlens_q, top_k, scale=scale,
                                      query_index=query_index, summary=summary)
    torch.ops.kvmem.memory_select(*params.to_schema())
    return params.selected


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
