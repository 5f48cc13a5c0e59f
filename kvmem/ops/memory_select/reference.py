"""Block summaries and top-k block selection for the memory bank (fp32 reference).

Semantics
---------
A *summary* describes one bank block (one page) per KV head in two vectors of ``head_dim``:
``summaries: [num_blocks, num_kv_heads, 2, head_dim]``, indexed by page id (a pool beside the
page pool), computed once when the block leaves the window (between steps).

* ``"minmax"`` (Quest): ``[min_t k_t, max_t k_t]`` channel-wise over the page's ``block_size``
  keys. The per-head score ``sum_d max(q_d * min_d, q_d * max_d)`` is an upper bound of the page's
  best ``q.k`` (each channel's product is bounded by one of its extremes).
* ``"box"`` (ArkVale): ``[centre, radius]`` with ``centre = mean_t k_t`` and
  ``radius = mean_t |k_t - centre|``; per-head score ``sum_d q_d * centre_d + |q_d| * radius_d``
  (an estimate, not a bound).
* ``"reps"`` (representative keys, after InfLLM): the page's two keys farthest (L2) from its mean
  key, ``[k_a, k_b]`` (``a`` the farther; ties: the earlier token; a one-token page repeats its
  key); per-head score ``max(q.k_a, q.k_b)``: two real keys' scores, a lower bound of the page's
  best ``q.k``.
* ``"mean"`` (the default of ``kvmem.MemoryConfig``): ``[centre, centre]``, the page's mean key
  (the second copy keeps the layout; scoring reads the first only); per-head score ``q.centre``,
  the mean of the page's ``q.k``. On SmolLM2's real keys it ranks the block a retrieval head
  attends to (the passkey's digits) far higher than the channel-wise bounds do
  (``benchmarks/RESULTS.md``, "selection rules").

Keys are summarised as cached, after ``k_scale`` (pre-RoPE in extend mode: select with the
pre-RoPE query then, so relevance does not depend on where the block is placed).

**Selection.** Row ``b`` scores its ``bank_lens[b]`` candidates ``bank_table[b, :bank_lens[b]]``
with one query token, ``query_index[b]`` (default: the first token of its segment,
``cu_seqlens_q[b]``; decode: the only one; chunked prefill runs one segment per query sub-block so
that later tokens never steer earlier queries' selection). Query head ``g`` scores position ``j``
``s_g(j) = scale * (its per-head score)`` (``head_scores``); one selection per KV head ``h``, so a
GQA group loads one set of pages, by the **group rule**: the maximum over the group's query heads
(``h * G .. h * G + G - 1``, ``G = Hq // Hkv``) of each head's *log-probability* of the block,
``s_g(j) - logsumexp_{j' live} s_g(j')`` (NaN scores count as ``-inf`` in the sum). A head whose
scores are flat (no block stands out) then never outvotes a head that points at one block, however
large its logits. With one query head per KV head this is the plain score order. The
``min(top_k, bank_lens[b])`` best positions by a stable top-k on ``(-score, position)`` are
returned in ascending order, ``-1`` padded: ``selected: [batch, num_kv_heads, top_k]`` int32. A
row without a query (empty segment, ``query_index[b] == -1``) or without candidates selects
nothing; a NaN score is never selected.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SUMMARY_KINDS", "compute_summaries", "write_summaries", "head_scores", "group_scores", "block_scores",
           "top_k_positions", "memory_select"]

SUMMARY_KINDS = ("minmax", "box", "reps", "mean")


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
    elif summary == "reps":
        return representative_keys(k)
    elif summary == "mean":
        low = high = k.mean(dim=1)
    else:
        raise ValueError(f"compute_summaries: argument 'summary' must be one of {SUMMARY_KINDS}, got {summary!r}")
    return torch.stack([low, high], dim=2)


def representative_keys(k: torch.Tensor) -> torch.Tensor:
    """``k: [N, bs, Hkv, D]`` fp32 -> ``[N, Hkv, 2, D]``: per (page, head) the two keys farthest
    from the page's mean key, the farther first (ties: the earlier token); ``bs == 1`` repeats it."""
    dist = (k - k.mean(dim=1, keepdim=True)).square().sum(-1)  # [N, bs, Hkv]
    order = torch.sort(dist, dim=1, descending=True, stable=True).indices  # ties: earlier token first
    pick = order[:, :2] if k.shape[1] >= 2 else order[:, :1].expand(-1, 2, -1)  # [N, 2, Hkv]
    reps = torch.gather(k, 1, pick[..., None].expand(-1, -1, -1, k.shape[-1]))  # [N, 2, Hkv, D]
    return reps.permute(0, 2, 1, 3).contiguous()


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


def head_scores(
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
    """``[batch, num_heads, max_bank]`` fp32 per-query-head scores ``scale * score``; ``-inf`` past
    ``bank_lens`` or with no query. Torch ops on the tensors' device, no host sync (entries past
    ``bank_lens`` may hold anything)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_blocks, num_kv_heads = summaries.shape[0], summaries.shape[1]
    group = num_heads // num_kv_heads
    batch, max_bank = bank_table.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if query_index is None:
        query_index = default_query_index(cu_seqlens_q)
    if q.shape[0] == 0 or num_blocks == 0 or max_bank == 0:  # nothing to score
        return torch.full((batch, num_heads, max_bank), -math.inf, dtype=torch.float32, device=q.device)
    index = query_index.long()
    qg = q[index.clamp(0, q.shape[0] - 1)].float().reshape(batch, num_kv_heads, group, 1, head_dim)  # [B, Hkv, G, 1, D]
    pages = bank_table.long().clamp(0, num_blocks - 1)
    s = summaries[pages].float().permute(0, 2, 1, 3, 4)  # [B, Hkv, max_bank, 2, D]
    low, high = s[:, :, :, 0], s[:, :, :, 1]  # [B, Hkv, max_bank, D]
    per = []
    for g in range(group):  # one query head at a time (bounded memory)
        qh = qg[:, :, g]  # [B, Hkv, 1, D]
        if summary == "minmax":
            per.append(torch.maximum(qh * low, qh * high).sum(-1))
        elif summary == "box":
            per.append((qh * low + qh.abs() * high).sum(-1))
        elif summary == "reps":
            per.append(torch.maximum((qh * low).sum(-1), (qh * high).sum(-1)))
        else:  # mean
            per.append((qh * low).sum(-1))
    scores = torch.stack(per, dim=2).reshape(batch, num_heads, max_bank) * scale
    live = torch.arange(max_bank, device=q.device)[None] < bank_lens.long()[:, None]  # [B, max_bank]
    live = live & (index >= 0)[:, None]
    return torch.where(live[:, None, :], scores, torch.full_like(scores, -math.inf))


def group_scores(per_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The group rule: ``per_head [batch, num_heads, n]`` -> ``[batch, num_kv_heads, n]``, each KV
    head's max over its query heads of ``s - logsumexp(s)`` (over the row; NaN counts as -inf).
    ``-inf`` stays ``-inf`` and NaN becomes ``-inf``: neither is ever selected."""
    batch, num_heads, n = per_head.shape
    finite = torch.where(torch.isnan(per_head), torch.full_like(per_head, -math.inf), per_head)
    lse = torch.logsumexp(finite, dim=-1, keepdim=True)  # -inf for a row with nothing live
    norm = per_head - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    norm = norm.reshape(batch, num_kv_heads, num_heads // num_kv_heads, n)
    return torch.where(torch.isnan(norm), torch.full_like(norm, -math.inf), norm).amax(dim=2)


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
    """``[batch, num_kv_heads, max_bank]`` fp32 selection scores (the group rule over
    ``head_scores``); ``-inf`` past ``bank_lens`` or with no query."""
    per_head = head_scores(q, summaries, bank_table, bank_lens, cu_seqlens_q, scale=scale, query_index=query_index,
                           summary=summary)
    return group_scores(per_head, summaries.shape[1])


def top_k_positions(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[batch, num_kv_heads, top_k]`` int32: the ``top_k`` best positions of ``scores``
    ``[batch, num_kv_heads, max_bank]`` by a stable top-k on ``(-score, position)``, ascending,
    ``-1`` for ``-inf`` scores and padding (every backend finishes its scores with this)."""
    batch, num_kv_heads, max_bank = scores.shape
    selected = torch.full((batch, num_kv_heads, top_k), -1, dtype=torch.int32, device=scores.device)
    k = min(top_k, max_bank)
    if k == 0:
        return selected
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]  # ties: lower position first
    keep = torch.gather(scores, -1, order) > -math.inf
    best = torch.where(keep, order, torch.full_like(order, max_bank))
    best = torch.sort(best, dim=-1).values
    selected[..., :k] = torch.where(best < max_bank, best, torch.full_like(best, -1)).to(torch.int32)
    return selected


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
    return top_k_positions(scores, top_k)
