"""Memory attention: one joint softmax over attention sinks, selected bank blocks and a local window.

The specification every memory-attention backend is tested against (fp32 math, no argument
checks: ``kvmem.ops.memory_attention.memory_attention`` validates). Pages, ``seq_lens``,
``cu_seqlens_q``, ``scale``, ``softcap``, ``sink_logits``, ``k_scale``/``v_scale`` and the RoPE
table mean what they mean for ``paged_attention`` (``kvmem.ops.reference``).

Semantics
---------
A memory-bank *block* is one page of the pool: ``bs = k_cache.shape[1]`` tokens. For row ``b``
with ``L = seq_lens[b]`` keys (after this step's write) and ``q_len`` queries, query ``i`` sits at
original position ``p = L - q_len + i`` (bottom-right aligned). Its keys are three disjoint sets:

* **sinks**: tokens ``[0, min(sink_blocks * bs, L))``, read through ``block_table[b, :sink_blocks]``
  (``sink_blocks`` is a host int, the same for every row), causal: token ``j`` is visible iff
  ``j <= p``;
* **selected bank blocks**: for KV head ``h``, the pages ``bank_table[b, selected[b, h, i]]`` for
  the non-empty entries ``selected[b, h, i] >= 0`` (positions into ``bank_table[b]``: ascending,
  unique, ``-1`` = empty, padding last). Every one is a full page lying before the window, visible
  to every query of the row (no mask);
* **window**: tokens ``[w0 * bs, L)`` with ``w0 = window_start[b] >= sink_blocks``, read through
  ``block_table[b, w0:]``, causal (``j <= p``). ``w0`` is fixed within a step, so either every
  query lies in the window (``w0 * bs <= L - q_len``) or the row has no window yet
  (``w0 == sink_blocks``: then the row is all sinks and window, as in plain causal attention).
  Selected blocks exist only when every query lies in the window: a query sub-block that starts
  among the sinks (a row's first chunk) selects nothing.

Query head ``h_q`` reads KV head ``h_q // (Hq // Hkv)`` and its selection. One softmax covers the
union (``sink_logits[h_q]`` joins its denominator); with ``softcap`` the score is
``softcap * tanh(scale * q.k / softcap)``. A query that sees no key gets ``out = 0`` and
``lse = -inf``.

**Positions (RoPE on load, extend mode).** With ``rope_cos_sin: [P, rot_dim]`` the pages hold
keys *before* RoPE and each key is rotated as it is loaded at its *compacted* position (cache
order with the gaps removed), with ``S = sink_blocks * bs`` and ``n_sel`` the number of non-empty
entries of ``selected[b, h]``:

* sink token ``j`` at ``j``;
* token ``o`` of the ``i``-th selected block (ascending bank order) at ``S + i * bs + o``;
* window token ``j`` at ``j - w0 * bs + S + n_sel * bs`` (contiguous after the selected blocks).

The caller rotates ``q`` at the same compacted position, ``p - (w0 - sink_blocks - n_sel) * bs``
(the identity while the row has no window and no bank). That requires ``n_sel`` to be the same for
every KV head of a row, which top-k selection gives (it fills ``min(top_k, bank_lens[b])``
entries) and validation checks. With ``w0 = max(sink_blocks, (L_start - window) // bs)`` the
largest distance a query then sees is below ``S + top_k * bs + window + bs + chunk``
(``kvmem.memory.MemoryConfig.max_distance``). Without ``rope_cos_sin``
(exact mode) keys are used as cached and positions only decide the causal mask.

**Block mass.** ``block_mass: [B, Hkv, max_bank]`` fp32, when given, is overwritten with, for each
bank position ``j`` of row ``b`` and KV head ``h``, the softmax probability that block's keys
received, summed over the row's queries and the group's query heads (0 where not selected). The
sinks, the window and ``sink_logits`` take the rest of each query's unit mass.

Shapes
------
q: [num_tokens, num_heads, head_dim]
k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
block_table: [batch, max_blocks] int32; seq_lens: [batch] int32; cu_seqlens_q: [batch + 1] int32
window_start: [batch] int32; bank_table: [batch, max_bank] int32;
selected: [batch, num_kv_heads, top_k] int32; block_mass: [batch, num_kv_heads, max_bank] fp32
out: [num_tokens, num_heads, head_dim] in q's dtype; lse: [num_tokens, num_heads] fp32

Reference method
----------------
For each (row, KV head): the compacted block table ``[sink pages, selected pages, window pages]``
is page-aligned and its causal order is the original one, so the existing reference
``paged_attention`` over a one-KV-head view of the caches, with the group's query heads, computes
it exactly (its key ``j`` of the compacted table is rotated at position ``j``: the compacted
position). Block mass is then ``sum exp(score - lse)`` over each selected block's keys.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from kvmem.ops import reference as paged_reference

__all__ = ["memory_attention", "compacted_pages"]


def compacted_pages(
    block_table_row: List[int], seq_len: int, block_size: int, sink_blocks: int, window_start: int,
    selected_pages: List[int],
) -> Tuple[List[int], int, int]:
    """The compacted table of one (row, KV head).

    Returns
    -------
    pages: page ids ``[sinks, selected, window]``
    compacted_len: number of keys in that table (its last page may be partial)
    shift: ``(window_start - sink_blocks - n_sel) * block_size``; original position minus
        compacted position of window tokens and queries
    """
    n_pages = -(-seq_len // block_size)
    sink_pages = block_table_row[: min(sink_blocks, n_pages)]
    window_pages = block_table_row[window_start:n_pages]
    if not window_pages:  # no window yet: the row is all sinks (nothing evicted, nothing selected)
        return sink_pages, min(seq_len, sink_blocks * block_size), 0
    shift = (window_start - sink_blocks - len(selected_pages)) * block_size
    return sink_pages + selected_pages + window_pages, seq_len - shift, shift


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
    block_mass: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over sinks + selected bank blocks + causal window (semantics: module docstring).

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in q's dtype
    lse: [num_tokens, num_heads] fp32
    """
    del max_seqlen_q, max_seqlen_k
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((num_tokens, num_heads), -math.inf, dtype=torch.float32, device=q.device)
    if block_mass is not None:
        block_mass.zero_()
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    tables, banks, starts = block_table.tolist(), bank_table.tolist(), window_start.tolist()
    chosen = selected.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_len = cu[b], cu[b + 1] - cu[b]
        if q_len == 0 or seq_len == 0:
            continue
        for h in range(num_kv_heads):
            positions = sorted(i for i in chosen[b][h] if i >= 0)
            pages, compacted_len, _ = compacted_pages(
                tables[b], seq_len, block_size, sink_blocks, starts[b], [banks[b][i] for i in positions])
            heads = slice(h * group, (h + 1) * group)
            qh = q[q_start:q_start + q_len, heads]
            one_head = dict(
                k_scale=_head_scale(k_scale, h), v_scale=_head_scale(v_scale, h),
                sink_logits=None if sink_logits is None else sink_logits[heads],
            )
            o, l = paged_reference.paged_attention(
                qh.float(), k_cache[:, :, h:h + 1], v_cache[:, :, h:h + 1],
                torch.tensor([pages], dtype=torch.int32, device=q.device),
                torch.tensor([compacted_len], dtype=torch.int32, device=q.device),
                torch.tensor([0, q_len], dtype=torch.int32, device=q.device), q_len, compacted_len,
                scale=scale, causal=True, softcap=softcap, rope_cos_sin=rope_cos_sin, rope_neox=rope_neox,
                **one_head)
            out[q_start:q_start + q_len, heads] = o
            lse[q_start:q_start + q_len, heads] = l
            if block_mass is not None and positions:
                # selected blocks exist only beside a window, so all sink pages are full and present
                selected_pages = pages[sink_blocks:sink_blocks + len(positions)]
                mass = _selected_block_mass(qh, k_cache[:, :, h], selected_pages, sink_blocks * block_size, l,
                                            scale, softcap, one_head["k_scale"], rope_cos_sin, rope_neox)
                block_mass[b, h, positions] = mass
    return out.to(q.dtype), lse


def _head_scale(scale: Optional[torch.Tensor], h: int) -> Optional[torch.Tensor]:
    if scale is None or scale.dim() == 0:
        return scale
    return scale[h:h + 1]


def _selected_block_mass(qh, k_pages, pages, first_position, lse, scale, softcap, k_scale, rope_cos_sin, rope_neox):
    """``[n_sel]``: summed probability of each selected block's keys, over the queries and heads of qh.

    qh: [q_len, group, head_dim]; k_pages: [num_blocks, block_size, head_dim] (one KV head);
    lse: [q_len, group] fp32 of the joint softmax.
    """
    block_size = k_pages.shape[1]
    k = k_pages[torch.tensor(pages, dtype=torch.long, device=qh.device)].float()  # [n_sel, bs, D]
    if k_scale is not None:
        k = k * k_scale.float().reshape(())
    n_sel = k.shape[0]
    if rope_cos_sin is not None:
        positions = torch.arange(first_position, first_position + n_sel * block_size, device=qh.device)
        k = paged_reference.apply_rotary(k.reshape(-1, 1, k.shape[-1]), rope_cos_sin, positions, rope_neox)
        k = k.reshape(n_sel, block_size, -1)
    s = torch.einsum("qgd,nkd->qgnk", qh.float(), k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p = torch.exp(s - lse[:, :, None, None])  # lse finite: these keys are visible to every query
    return p.sum(dim=(0, 1, 3))
