"""Argument checks of ``memory_select`` and the summary functions (structure always; values with ``check``).

Every failure is a ``TypeError`` or ``ValueError`` naming the function, the argument and what was
expected.
"""

from __future__ import annotations

import math

import torch

from kvmem.ops import _validate as v
from kvmem.ops._validate import FLOAT_DTYPES, QUANT_CACHE_DTYPES, _fail
from kvmem.ops.memory_select.reference import SUMMARY_KINDS


def summary_kind(op: str, summary):
    if summary not in SUMMARY_KINDS:
        _fail(op, "summary", f"one of {SUMMARY_KINDS}", repr(summary))


def summaries_tensor(op: str, summaries, num_kv_heads: int, head_dim: int, device):
    v.tensor(op, "summaries", summaries, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    if tuple(summaries.shape[1:]) != (num_kv_heads, 2, head_dim):
        _fail(op, "summaries", f"of shape (num_blocks, {num_kv_heads}, 2, {head_dim})", f"shape {tuple(summaries.shape)}")


def select_structure(q, summaries, bank_table, bank_lens, cu_seqlens_q, top_k, scale, query_index, summary):
    op = "memory_select"
    v.tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    dev = q.device
    v.tensor(op, "summaries", summaries, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    num_kv_heads = summaries.shape[1]
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads:
        _fail(op, "q", f"a number of heads divisible by the summaries' num_kv_heads={num_kv_heads}", f"{q.shape[1]} heads")
    summaries_tensor(op, summaries, num_kv_heads, q.shape[2], dev)
    v.tensor(op, "bank_table", bank_table, ndim=2, dtypes=(torch.int32,), device=dev)
    batch = bank_table.shape[0]
    v.tensor(op, "bank_lens", bank_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    v.shape(op, "bank_lens", bank_lens, (batch,))
    v.tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=dev)
    v.shape(op, "cu_seqlens_q", cu_seqlens_q, (batch + 1,))
    v.host_int(op, "top_k", top_k)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        _fail(op, "scale", "None or a finite float > 0", scale)
    if query_index is not None:
        v.tensor(op, "query_index", query_index, ndim=1, dtypes=(torch.int32,), device=dev)
        v.shape(op, "query_index", query_index, (batch,))
    summary_kind(op, summary)


def select_values(q, summaries, bank_table, bank_lens, cu_seqlens_q, query_index):
    op = "memory_select"
    lens, cu = bank_lens.cpu(), cu_seqlens_q.cpu()
    max_bank, num_blocks = bank_table.shape[1], summaries.shape[0]
    if cu[0].item() != 0 or bool((cu[1:] < cu[:-1]).any()) or cu[-1].item() != q.shape[0]:
        _fail(op, "cu_seqlens_q", f"a non-decreasing prefix sum from 0 to q.shape[0]={q.shape[0]}", cu.tolist())
    bad = (lens < 0) | (lens > max_bank)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        _fail(op, "bank_lens", f"in [0, max_bank={max_bank}]", f"bank_lens[{b}]={int(lens[b])}")
    table = bank_table.cpu()
    live = torch.arange(max_bank)[None] < lens[:, None]
    bad = live & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        _fail(op, "bank_table", f"page ids in [0, num_blocks={num_blocks}) below bank_lens[{b}]",
              f"bank_table[{b}, {j}]={int(table[b, j])}")
    if query_index is not None:
        index = query_index.cpu()
        bad = (index < -1) | (index >= q.shape[0])
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            _fail(op, "query_index", f"token indices into q in [-1, {q.shape[0]})", f"query_index[{b}]={int(index[b])}")


def summaries_structure(op, k_cache, page_ids, summary, k_scale, summaries=None):
    v.tensor(op, "k_cache", k_cache, ndim=4, dtypes=QUANT_CACHE_DTYPES if k_scale is not None else FLOAT_DTYPES)
    dev = k_cache.device
    v.tensor(op, "page_ids", page_ids, ndim=1, dtypes=(torch.int32, torch.int64), device=dev, like="k_cache")
    summary_kind(op, summary)
    v.kv_scales(op, k_scale, k_scale, k_cache.shape[2], dev)
    if summaries is not None:
        summaries_tensor(op, summaries, k_cache.shape[2], k_cache.shape[3], dev)
        if summaries.shape[0] != k_cache.shape[0]:
            _fail(op, "summaries", f"one row per page of k_cache ({k_cache.shape[0]})", f"shape {tuple(summaries.shape)}")


def page_ids_values(op, k_cache, page_ids):
    ids = page_ids.cpu()
    bad = (ids < 0) | (ids >= k_cache.shape[0])
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        _fail(op, "page_ids", f"in [0, num_blocks={k_cache.shape[0]})", f"page_ids[{i}]={int(ids[i])}")
