"""``memory_select`` in batched torch ops: no Python loop over rows, no device->host sync.

Same semantics as ``kvmem.ops.memory_select.reference`` (its module docstring); the scores are
the same sums computed as two matrix products per KV head group (``max(q*lo, q*hi)`` summed over
channels is ``relu(q).hi + min(q, 0).lo`` for min/max summaries) and the group rule
(``reference.group_scores``), so they may differ from the reference in the last bits: compare selections as sets, ignoring blocks within tolerance of the
k-th score (as the op tests do). Fixed ``top_k`` and fixed table widths give static shapes
(``torch.compile(fullgraph=True)``, CUDA graphs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kvmem.ops.memory_select.reference import SUMMARY_KINDS, group_scores

__all__ = ["block_scores", "memory_select"]


def block_scores(q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor, bank_lens: torch.Tensor,
                 query_index: torch.Tensor, *, scale: Optional[float] = None, summary: str = "minmax") -> torch.Tensor:
    """``[batch, num_kv_heads, max_bank]`` fp32 scores; ``-inf`` past ``bank_lens`` or where
    ``query_index[b] < 0``.

    Parameters
    ----------
    q: [num_tokens, num_heads, head_dim]
    summaries: [num_pages, num_kv_heads, 2, head_dim]
    bank_table: [batch, max_bank] int32 page ids (entries past ``bank_lens`` arbitrary)
    bank_lens: [batch] int32
    query_index: [batch] int32 token of ``q`` each row selects with, -1 = none
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = summaries.shape[1]
    group = num_heads // num_kv_heads
    batch, max_bank = bank_table.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    index = query_index.long()
    qg = q.index_select(0, index.clamp(min=0)).float().reshape(batch, num_kv_heads, group, head_dim)
    pages = bank_table.long().clamp(min=0, max=summaries.shape[0] - 1)
    if summary not in SUMMARY_KINDS:
        raise ValueError(f"memory_select: argument 'summary' must be one of {SUMMARY_KINDS}, got {summary!r}")
    if summaries.shape[0] <= min(batch, 16) * max_bank:
        # fewer pages in the pool than (row, bank position) pairs -- e.g. a prefill chunk's query
        # sub-blocks, all rows of one sequence's bank: score every page once, then gather each
        # row's bank (no [batch, max_bank] copy of the summaries). Scoring a page costs a few
        # FLOPs per query head where gathering it copies 2 x Hkv x D floats, so up to 16x the
        # bank's pages this is still the cheaper path (rows with banks of their own: decode)
        per_head = _pool_scores(qg, summaries, summary).gather(
            -1, pages[:, None, None, :].expand(batch, num_kv_heads, group, max_bank))
    else:
        per_head = _gathered_scores(qg, summaries, pages, summary)
    per_head = per_head.reshape(batch, num_heads, max_bank) * scale  # [B, Hq, n]
    valid = (torch.arange(max_bank, device=q.device)[None, :] < bank_lens.long()[:, None]) & (index[:, None] >= 0)
    return group_scores(per_head.masked_fill(~valid[:, None, :], -math.inf), num_kv_heads)


def _pair(qg: torch.Tensor, low: torch.Tensor, high: torch.Tensor, summary: str) -> torch.Tensor:
    """The per-query-head score of ``qg [..., G, D]`` against summaries ``low/high [..., D, n]``."""
    if summary == "minmax":
        return torch.matmul(qg.clamp(min=0), high) + torch.matmul(qg.clamp(max=0), low)
    if summary == "box":
        return torch.matmul(qg, low) + torch.matmul(qg.abs(), high)
    if summary == "reps":
        return torch.maximum(torch.matmul(qg, low), torch.matmul(qg, high))
    return torch.matmul(qg, low)  # mean


def _pool_scores(qg: torch.Tensor, summaries: torch.Tensor, summary: str) -> torch.Tensor:
    """``[B, Hkv, G, num_pages]``: every page of the summary pool scored by every row's queries."""
    batch, num_kv_heads, group, head_dim = qg.shape
    s = summaries.float().permute(1, 2, 3, 0)  # [Hkv, 2, D, N]
    low = s[:, 0]
    high = low if summary == "mean" else s[:, 1]
    q2 = qg.transpose(0, 1).reshape(num_kv_heads, batch * group, head_dim)  # one GEMM per KV head
    out = _pair(q2, low, high, summary)  # [Hkv, B * G, N]
    return out.reshape(num_kv_heads, batch, group, -1).transpose(0, 1)


def _gathered_scores(qg: torch.Tensor, summaries: torch.Tensor, pages: torch.Tensor, summary: str) -> torch.Tensor:
    """``[B, Hkv, G, max_bank]``: each row's bank summaries gathered, then scored."""
    batch, max_bank = pages.shape
    num_kv_heads, head_dim = summaries.shape[1], summaries.shape[3]
    s = summaries.index_select(0, pages.reshape(-1)).float()
    s = s.reshape(batch, max_bank, num_kv_heads, 2, head_dim).permute(0, 2, 3, 4, 1)  # [B, Hkv, 2, D, n]
    return _pair(qg, s[:, :, 0], s[:, :, 1], summary)  # [B, Hkv, G, n]


def memory_select(q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor, bank_lens: torch.Tensor,
                  query_index: torch.Tensor, top_k: int, *, scale: Optional[float] = None,
                  summary: str = "minmax") -> torch.Tensor:
    """Top-k bank positions per (row, KV head): ``[batch, num_kv_heads, top_k]`` int32, ascending,
    ``-1`` padded (stable top-k on ``(-score, position)``)."""
    scores = block_scores(q, summaries, bank_table, bank_lens, query_index, scale=scale, summary=summary)
    batch, num_kv_heads, max_bank = scores.shape
    k = min(top_k, max_bank)
    if k == 0:
        return torch.full((batch, num_kv_heads, top_k), -1, dtype=torch.int32, device=q.device)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    keep = torch.gather(scores, -1, order) > -math.inf
    best = torch.sort(torch.where(keep, order, torch.full_like(order, max_bank)), dim=-1).values
    chosen = torch.where(best < max_bank, best, torch.full_like(best, -1)).to(torch.int32)
    if k < top_k:
        pad = torch.full((batch, num_kv_heads, top_k - k), -1, dtype=torch.int32, device=q.device)
        chosen = torch.cat([chosen, pad], dim=-1)
    return chosen
