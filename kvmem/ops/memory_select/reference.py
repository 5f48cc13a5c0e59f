"""Block summaries and top-k block selection for the memory bank (fp32 reference).

Semantics
---------
A *summary* describes one bank block (one page) per KV head in two vectors of ``head_dim``:
``summaries: [num_blocks, num_kv_heads, 2, head_dim]``, indexed by page id (a pool beside the
page pool), computed once when the block leaves the window (between steps).

* ``"minmax"`` (Quest): ``[min_t k_t, max_t k_t]`` channel-wise over the page's ``block_size``
  keys. The score ``sum_d max(q_d * min_d, q_d * max_d)`` is an upper bound of the page's best
  ``q.k`` (each channel's product is bounded by one of its extremes).
* ``"box"`` (ArkVale): ``[centre, radius]`` with ``centre = mean_t k_t`` and
  ``radius = mean_t |k_t - centre|``; score ``sum_d q_d * centre_d + |q_d| * radius_d``
  (an estimate, not a bound).

Keys are summarised as cached, after ``k_scale`` (pre-RoPE in extend mode: select with the
pre-RoPE query then, so relevance does not depend on where the block is placed).

**Selection.** Row ``b`` scores its ``bank_lens[b]`` candidates ``bank_table[b, :bank_lens[b]]``
with one query token, ``query_index[b]`` (default: the first token of its segment,
``cu_seqlens_q[b]``; decode: the only one; chunked prefill runs one segment per query sub-block so
that later tokens never steer earlier queries' selection). The score of bank position ``j`` for
KV head ``h`` is ``scale *`` the *maximum over the group's query heads* (``h * G .. h * G + G - 1``,
``G = Hq // Hkv``) of the per-head score: one selection per KV head, so a GQA group loads one
set of pages. The ``min(top_k, bank_lens[b])`` best positions by a stable top-k on
``(-score, position)`` are returned in ascending order, ``-1`` padded:
``selected: [batch, num_kv_heads, top_k]`` int32. A row without a query (empty segment,
``query_index[b] == -1``) or without candidates selects nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SUMMARY_KINDS", "compute_summaries", "write_summaries", "block_scores", "memory_select"]

SUMMARY_KINDS = ("minmax", "box")


def compute_summaries(
    k_cache: torch.Tensor, page_ids: torch.Tensor, *, summary: str = "minmax", k_scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Summaries of whole pages.

    Parameters
    ----------
    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    page_ids: [N] integer page ids (every page full)
    k_scale: fp32 0-d or [num_kv_heads] dequantisation scale, or None

    Returns
    -------
    [N, num_kv_heads, 2, head_dim] fp32
    """
    k = k_cache[page_ids.long()].float()  # [N, bs, Hkv, D]
    if k_scale is not None:
        k = k * (k_scale.float().reshape(1, 1, -1, 1) if k_scale.dim() == 1 else k_scale.float())
    if summary == "minmax":
        low, high = k.amin(dim=1), k.amax(dim=1)
    elif summary == "box":
        low = k.mean(dim=1)
        high = (k - low[:, None]).abs().mean(dim=1)
    else:
        raise ValueError(f"compute_summaries: argument 'summary' must be one of {SUMMARY_KINDS}, got {summary!r}")
    return torch.stack([low, high], dim=2)


def write_summaries(
    summaries: torch.Tensor, k_cache: torch.Tensor, page_ids: torch.Tensor, *, summary: str = "minmax",
    k_scale: Optional[torch.Tensor] = None,
) -> None:
    """``summaries[page_ids] = compute_summaries(k_cache, page_ids)`` in place (cast to its dtype).

    summaries: [num_blocks, num_kv_heads, 2, head_dim]
    """
    if page_ids.numel():
        summaries[page_ids.long()] = compute_summaries(k_cache, page_ids, summary=summary, k_scale=k_scale).to(summaries.dtype)


def default_query_index(cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """``[batch]`` int32: each row's first query token, -1 for an empty segment."""
    first, end = cu_seqlens_q[:-1], cu_seqlens_q[1:]
    return torch.where(end > first, first, torch.full_like(first, -1)).to(torch.int32)


def block_scores(
    q: torch.Tensor,
    summaries: torch.Tensor,
    bank_table: torch.Tensor,
    bank_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    scale: Optional[float] = None,
    query_index: Optional[torch.Tensor] = None,
    summary: str = "minmax",
) -> torch.Tensor:
    """``[batch, num_kv_heads, max_bank]`` fp32 selection scores; ``-inf`` past ``bank_lens`` or with no query."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = summaries.shape[1]
    group = num_heads // num_kv_heads
    batch, max_bank = bank_table.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if query_index is None:
        query_index = default_query_index(cu_seqlens_q)
    scores = torch.full((batch, num_kv_heads, max_bank), -math.inf, dtype=torch.float32, device=q.device)
    lens, index = bank_lens.tolist(), query_index.tolist()
    for b in range(batch):
        n, t = lens[b], index[b]
        if n == 0 or t < 0:
            continue
        qg = q[t].float().reshape(num_kv_heads, group, 1, head_dim)  # [Hkv, G, 1, D]
        s = summaries[bank_table[b, :n].long()].float().transpose(0, 1)  # [Hkv, n, 2, D]
        low, high = s[:, None, :, 0], s[:, None, :, 1]  # [Hkv, 1, n, D]
        if summary == "minmax":
            per_head = torch.maximum(qg * low, qg * high).sum(-1)  # [Hkv, G, n]
        else:
            per_head = (qg * low + qg.abs() * high).sum(-1)
        scores[b, :, :n] = per_head.amax(dim=1) * scale
    return scores


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
) -> torch.Tensor:
    """Top-k bank positions per (row, KV head) (semantics: module docstring).

    Returns
    -------
    selected: [batch, num_kv_heads, top_k] int32, ascending positions into ``bank_table[b]``, -1 padded
    """
    scores = block_scores(q, summaries, bank_table, bank_lens, cu_seqlens_q, scale=scale,
                          query_index=query_index, summary=summary)
    batch, num_kv_heads, max_bank = scores.shape
    selected = torch.full((batch, num_kv_heads, top_k), -1, dtype=torch.int32, device=q.device)
    k = min(top_k, max_bank)
    if k == 0:
        return selected
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]  # ties: lower position first
    keep = torch.gather(scores, -1, order) > -math.inf
    best = torch.where(keep, order, torch.full_like(order, max_bank))
    best = torch.sort(best, dim=-1).values
    selected[..., :k] = torch.where(best < max_bank, best, torch.full_like(best, -1)).to(torch.int32)
    return selected
