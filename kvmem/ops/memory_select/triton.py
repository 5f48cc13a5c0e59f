"""Triton per-query-head block scores of ``memory_select``; the group rule and the stable top-k
are finished by torch on the device (``reference.group_scores`` and ``reference.top_k_positions``,
so the tie order is the reference's exactly). No host sync.

One program per (row, KV head, tile of ``BLOCK_N`` bank positions): it loads the row's query token
(``query_index[b]``), the tile's page ids and their summaries ``[BLOCK_N, BLOCK_D]`` (low and
high, loaded once for the group), and writes, for each of the group's query heads,
``sum_d max(q_d*low_d, q_d*high_d)`` (minmax), ``sum_d q_d*low_d + |q_d|*high_d`` (box) or
``max(q.low, q.high)`` (reps) or ``q.low`` (mean: ``high`` is not loaded), times ``scale``. Positions past ``bank_lens[b]``, or of a row
without a query (``query_index[b] == -1``), score ``-inf``; their page ids are never loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmem.ops import _triton as _cfg
from kvmem.ops.memory_select.reference import SUMMARY_KINDS, default_query_index, group_scores, top_k_positions

__all__ = ["memory_select", "block_scores", "head_scores"]

BLOCK_N = 32  # bank positions per program


# Every int argument is a size or a stride that may be anything (summaries are fp32 or the cache
# dtype, bank tables and scores have free row strides): none is value-specialised.
@triton.jit(do_not_specialize=["stride_qt", "stride_qh", "stride_sb", "stride_sh", "stride_ss", "stride_bb",
                               "stride_ob", "stride_oh", "num_tokens", "group", "max_bank", "head_dim"])
def _block_scores_kernel(
    scores_ptr,
    q_ptr,
    summaries_ptr,
    bank_ptr,
    bank_lens_ptr,
    query_index_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_sb,
    stride_sh,
    stride_ss,
    stride_bb,
    stride_ob,
    stride_oh,
    num_tokens,
    group,
    max_bank,
    head_dim,
    KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_live = tl.load(bank_lens_ptr + b)
    t = tl.load(query_index_ptr + b).to(tl.int64)
    has_query = (t >= 0) & (t < num_tokens)
    n_live = tl.where(has_query, n_live, 0)  # a row without a query scores nothing
    live = (offs_n < n_live) & (offs_n < max_bank)
    pages = tl.load(bank_ptr + b * stride_bb + offs_n, mask=live, other=0).to(tl.int64)
    s_off = pages[:, None] * stride_sb + h * stride_sh + offs_d[None, :]
    s_mask = live[:, None] & d_ok[None, :]
    low = tl.load(summaries_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    if KIND != 3:  # mean: the first vector only
        high = tl.load(summaries_ptr + s_off + stride_ss, mask=s_mask, other=0.0).to(tl.float32)
    t_safe = tl.where(has_query, t, 0)
    for g in range(0, group):
        qv = tl.load(q_ptr + t_safe * stride_qt + (h * group + g) * stride_qh + offs_d,
                     mask=d_ok, other=0.0).to(tl.float32)[None, :]
        if KIND == 1:  # box
            per_head = tl.sum(qv * low + tl.abs(qv) * high, axis=1)
        elif KIND == 3:  # mean
            per_head = tl.sum(qv * low, axis=1)
        elif KIND == 2:  # reps
            a = tl.sum(qv * low, axis=1)
            c = tl.sum(qv * high, axis=1)
            per_head = tl.where((a != a) | (c != c), a + c, tl.maximum(a, c))  # NaN stays NaN
        else:  # minmax
            per_head = tl.sum(tl.maximum(qv * low, qv * high), axis=1)
        out = tl.where(live, per_head * qk_scale, float("-inf"))
        tl.store(scores_ptr + b * stride_ob + (h * group + g) * stride_oh + offs_n, out, mask=offs_n < max_bank)


def head_scores(q, summaries, bank_table, bank_lens, query_index, scale: float, summary: str) -> torch.Tensor:
    """``[batch, num_heads, max_bank]`` fp32 per-query-head scores (``reference.head_scores``'s
    meaning); ``query_index`` ``[batch]`` int32 is required here (the launcher resolves the default)."""
    assert q.stride(-1) == 1 and summaries.stride(-1) == 1
    batch, max_bank = bank_table.shape
    num_kv_heads = summaries.shape[1]
    scores = torch.empty((batch, q.shape[1], max_bank), dtype=torch.float32, device=q.device)
    if batch == 0 or max_bank == 0 or num_kv_heads == 0:
        return scores
    if q.shape[0] == 0 or summaries.shape[0] == 0:
        return scores.fill_(float("-inf"))
    grid = (batch, num_kv_heads, triton.cdiv(max_bank, BLOCK_N))
    _block_scores_kernel[grid](
        scores, q, summaries, bank_table, bank_lens, query_index, float(scale),
        q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1), summaries.stride(2),
        bank_table.stride(0), scores.stride(0), scores.stride(1),
        q.shape[0], q.shape[1] // num_kv_heads, max_bank, q.shape[2],
        KIND=SUMMARY_KINDS.index(summary), BLOCK_N=BLOCK_N, BLOCK_D=_cfg.block_d(q.shape[2]), num_warps=4, num_stages=1,
    )
    return scores


def block_scores(q, summaries, bank_table, bank_lens, query_index, scale: float, summary: str) -> torch.Tensor:
    """``[batch, num_kv_heads, max_bank]`` fp32 scores (``reference.block_scores``'s meaning)."""
    per_head = head_scores(q, summaries, bank_table, bank_lens, query_index, scale, summary)
    return group_scores(per_head, summaries.shape[1])


def memory_select(selected, q, summaries, bank_table, bank_lens, cu_seqlens_q, scale, query_index=None,
                  summary="minmax") -> None:
    """Writes ``selected`` ``[batch, num_kv_heads, top_k]`` (the ``kvmem::memory_select`` schema)."""
    if query_index is None:
        query_index = default_query_index(cu_seqlens_q)
    scores = block_scores(q, summaries, bank_table, bank_lens, query_index, scale, summary)
    selected.copy_(top_k_positions(scores, selected.shape[2]))


AOT_KERNELS = {"memory_select_scores": _block_scores_kernel}  # for tools/aot_compile_triton.py


def aot_variants(arch: int = 80):
    """Every variant the launcher can pick: per q dtype, BLOCK_D and summary kind (``KIND`` = its
    index in ``SUMMARY_KINDS``; summaries in
    fp32, what ``kvmem.memory`` keeps)."""
    del arch
    for dtype in _cfg.DTYPES:
        dn = _cfg.DTYPE_NAMES[dtype]
        for bd in _cfg.block_ds():
            for kind in range(len(SUMMARY_KINDS)):
                yield _cfg.AotVariant("memory_select_scores", dn,
                                      (("KIND", kind), ("BLOCK_N", BLOCK_N), ("BLOCK_D", bd)), 4, 1)
