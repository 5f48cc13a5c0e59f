"""Memory attention on the fast paged-attention kernels: compacted block tables, one call per KV head.

For each (row, KV head) the keys of memory attention — sink pages, the selected bank pages, the
window pages — form a page-aligned *compacted* block table whose causal order is the original
one, and whose key ``j`` sits at compacted position ``j`` (the position RoPE-on-load rotates it
at). So memory attention *is* ``paged_attention`` over that table, for the KV head's group of
query heads, on a one-KV-head view of the pools (the kernels take strides: no copy). This module
builds the tables on the device (no host sync, fixed shapes for a fixed ``top_k``) and runs one
``paged_attention`` per KV head through the dispatcher, so every paged backend (C++ CPU, Triton,
CUDA) serves memory attention with one softmax and exact results.

Cost over ``paged_attention`` on the same keys: building ``[num_kv_heads, batch, width]`` int32
tables, and ``num_kv_heads`` kernel calls instead of one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["compacted_tables", "memory_attention", "selected_block_mass"]


def compacted_tables(block_table: torch.Tensor, seq_lens: torch.Tensor, window_start: torch.Tensor,
                     bank_table: torch.Tensor, selected: torch.Tensor, sink_blocks: int, block_size: int,
                     window_blocks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The compacted block tables and key counts of every (KV head, row).

    Parameters
    ----------
    block_table: [batch, max_blocks] int32
    seq_lens: [batch] int32
    window_start: [batch] int32
    bank_table: [batch, max_bank] int32
    selected: [batch, num_kv_heads, top_k] int32 (ascending, -1 padding last)
    sink_blocks, block_size: host ints
    window_blocks: host int, an upper bound of the window's page count of any row

    Returns
    -------
    tables: [num_kv_heads, batch, sink_blocks + top_k + window_blocks] int32 (entries past a
        table's length are arbitrary valid page ids, never read)
    lens: [num_kv_heads, batch] int32, keys in each compacted table
    """
    batch, max_blocks = block_table.shape
    num_kv_heads, top_k = selected.shape[1], selected.shape[2]
    width = sink_blocks + top_k + window_blocks
    dev = block_table.device
    slot = torch.arange(width, device=dev, dtype=torch.int64)  # [W]
    sel = selected.to(torch.int64)
    n_sel = (sel >= 0).sum(-1)  # [B, Hkv]
    table = block_table.to(torch.int64)
    if bank_table.shape[1] > 0 and top_k > 0:
        sel_pages = torch.gather(bank_table.to(torch.int64), 1, sel.clamp(min=0).reshape(batch, -1))
        sel_pages = sel_pages.reshape(batch, num_kv_heads, top_k)
        sel_at = sel_pages[:, :, (slot - sink_blocks).clamp(0, top_k - 1)]  # [B, Hkv, W]
    else:
        sel_at = torch.zeros(batch, num_kv_heads, width, dtype=torch.int64, device=dev)
    w0 = window_start.to(torch.int64)
    win_idx = w0[:, None, None] + (slot[None, None, :] - sink_blocks - n_sel[:, :, None])
    win_idx = win_idx.clamp(0, max_blocks - 1)
    win_at = torch.gather(table, 1, win_idx.reshape(batch, -1)).reshape(batch, num_kv_heads, width)
    if sink_blocks > 0:
        sink_at = table[:, slot.clamp(max=min(sink_blocks, max_blocks) - 1)][:, None, :]
    else:
        sink_at = win_at
    in_sinks = slot[None, None, :] < sink_blocks
    in_sel = slot[None, None, :] < sink_blocks + n_sel[:, :, None]
    out = torch.where(in_sinks, sink_at, torch.where(in_sel, sel_at, win_at))
    # Rows whose window is empty keep only their sinks (nothing is selected there).
    lens64 = seq_lens.to(torch.int64)[:, None]
    n_pages = (lens64 + block_size - 1) // block_size
    shift = (w0[:, None] - sink_blocks - n_sel) * block_size
    lens = torch.where(n_pages > w0[:, None], lens64 - shift, lens64.clamp(max=sink_blocks * block_size))
    return (out.permute(1, 0, 2).to(torch.int32).contiguous(),
            lens.t().to(torch.int32).contiguous())


def memory_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *,
                     sink_blocks: int, window_start, bank_table, selected, scale: float,
                     softcap: Optional[float] = None, sink_logits=None, k_scale=None, v_scale=None,
                     rope_cos_sin=None, rope_neox: bool = True, out=None, lse=None, paged_attention=None):
    """Memory attention as ``num_kv_heads`` paged-attention calls over compacted tables.

    Arguments as ``kvmem.ops.memory_attention.memory_attention`` (already validated); ``out``
    ``[T, Hq, D]`` and ``lse`` ``[T, Hq]`` fp32 (optional) are written in place.
    ``paged_attention``: the function to run (default: ``kvmem.paged_attention`` without checks,
    i.e. the dispatcher's choice).
    """
    if paged_attention is None:
        from kvmem.ops import paged_attention as _pa

        def paged_attention(*args, **kwargs):
            return _pa(*args, check=False, **kwargs)

    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_blocks = block_table.shape[1]
    window_blocks = max(1, min(max_blocks, -(-max_seqlen_k // block_size)) - sink_blocks)
    tables, lens = compacted_tables(block_table, seq_lens, window_start, bank_table, selected, sink_blocks,
                                    block_size, window_blocks)
    max_k = min(max_seqlen_k, tables.shape[2] * block_size)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if _one_call(q, k_cache, v_cache, sink_logits, k_scale):
        return _heads_as_rows(paged_attention, q, k_cache, v_cache, tables, lens, cu_seqlens_q, max_seqlen_q, max_k,
                              scale=scale, softcap=softcap, k_scale=k_scale, v_scale=v_scale,
                              rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, out=out, lse=lse)
    for h in range(num_kv_heads):
        heads = slice(h * group, (h + 1) * group)
        per_head = {}
        if k_scale is not None:
            per_head["k_scale"] = k_scale if k_scale.dim() == 0 else k_scale[h:h + 1]
            per_head["v_scale"] = v_scale if v_scale.dim() == 0 else v_scale[h:h + 1]
        res = paged_attention(
            q[:, heads], k_cache[:, :, h:h + 1], v_cache[:, :, h:h + 1], tables[h], lens[h], cu_seqlens_q,
            max_seqlen_q, max_k, scale=scale, causal=True, softcap=softcap,
            sink_logits=None if sink_logits is None else sink_logits[heads],
            rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, out=out[:, heads], return_lse=lse is not None,
            **per_head)
        if lse is not None:
            lse[:, heads] = res[1]
    return out


def _one_call(q, k_cache, v_cache, sink_logits, k_scale) -> bool:
    """Whether the KV heads can run as the rows of one ``paged_attention`` call (``_heads_as_rows``):
    on the CPU (int64 page offsets in the C++ kernels), pools laid out densely
    (``[N, block_size, Hkv, D]`` contiguous: the virtual pages' addresses rely on it), with no
    per-query-head sink logits and no per-KV-head scale (one call has one of each for all its rows)."""
    _, bs, hkv, d = k_cache.shape
    dense = all(c.stride(3) == 1 and c.stride(2) == d and c.stride(1) == hkv * d and c.stride(0) == bs * hkv * d
                for c in (k_cache, v_cache))
    return (hkv > 1 and dense and q.device.type == "cpu" and sink_logits is None
            and (k_scale is None or k_scale.dim() == 0))


def _heads_as_rows(paged_attention, q, k_cache, v_cache, tables, lens, cu_seqlens_q, max_seqlen_q, max_k, *,
                   scale, softcap, k_scale, v_scale, rope_cos_sin, rope_neox, out, lse):
    """All KV heads in one ``paged_attention`` call: (KV head ``h``, row ``b``) is row ``h * B + b``.

    The pools are viewed (no copy) as one-KV-head pools of *virtual pages*: virtual page
    ``p * (Hkv * block_size) + h`` starts at head ``h`` of page ``p`` (a page stride of ``D``
    elements, the token stride unchanged), so each row's compacted table becomes virtual page ids.
    The queries of a KV head's group are gathered head-major (``[Hkv * T, G, D]``, a small copy)
    and the output scattered back.
    """
    T, Hq, D = q.shape
    num_pages, block_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    group = Hq // num_kv_heads
    batch = tables.shape[1]

    def virtual(cache):
        n = (num_pages - 1) * num_kv_heads * block_size + num_kv_heads
        return cache.as_strided((n, block_size, 1, D), (D, cache.stride(1), D, 1))  # keeps its storage offset

    head = torch.arange(num_kv_heads, device=tables.device, dtype=torch.int64)[:, None, None]
    vtables = (tables.to(torch.int64) * (num_kv_heads * block_size) + head).reshape(num_kv_heads * batch, -1)
    qh = q.reshape(T, num_kv_heads, group, D).transpose(0, 1).reshape(num_kv_heads * T, group, D)
    cu = cu_seqlens_q.to(torch.int64)
    vcu = torch.cat([(cu[:-1][None, :] + T * head[:, :, 0]).reshape(-1), cu[-1:] + T * (num_kv_heads - 1)])
    res = paged_attention(qh, virtual(k_cache), virtual(v_cache), vtables.to(torch.int32), lens.reshape(-1),
                          vcu.to(torch.int32), max_seqlen_q, max_k, scale=scale, causal=True, softcap=softcap,
                          k_scale=k_scale, v_scale=v_scale, rope_cos_sin=rope_cos_sin, rope_neox=rope_neox,
                          out=torch.empty_like(qh), return_lse=lse is not None)
    o = res[0] if isinstance(res, tuple) else res
    out.copy_(o.reshape(num_kv_heads, T, group, D).transpose(0, 1).reshape(T, Hq, D))
    if lse is not None:
        lse.copy_(res[1].reshape(num_kv_heads, T, group).transpose(0, 1).reshape(T, Hq))
    return out


def selected_block_mass(q, k_cache, bank_table, selected, cu_seqlens_q, max_seqlen_q: int, lse, *, sink_blocks: int,
                        scale: float, softcap: Optional[float] = None, k_scale=None, rope_cos_sin=None,
                        rope_neox: bool = True, block_mass):
    """``block_mass: [batch, Hkv, max_bank]`` fp32 overwritten with each bank position's attention
    mass (the reference's definition: ``exp(score - lse)`` summed over the selected block's keys,
    the row's queries and the KV head's query heads; 0 where not selected), from the ``lse`` of the
    joint softmax (``memory_attention(..., lse=)``). Torch ops, no host sync; workspace
    ``batch * max_seqlen_q * group * top_k * block_size`` fp32 per KV head.

    q: [T, Hq, D] (as attended: rotated at compacted positions with ``rope_cos_sin``); lse: [T, Hq]
    fp32; the other arguments as ``memory_attention``.
    """
    from kvmem.ops.paged_attention.reference import apply_rotary

    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    batch, _, top_k = selected.shape
    block_mass.zero_()
    if top_k == 0 or bank_table.shape[1] == 0 or num_tokens == 0 or max_seqlen_q == 0:
        return block_mass
    dev = q.device
    cu = cu_seqlens_q.long()
    index = cu[:-1, None] + torch.arange(max_seqlen_q, device=dev)  # [B, Q] token of each (row, query)
    real = index < cu[1:, None]
    index = index.clamp(max=num_tokens - 1)
    qs, ls = q[index].float(), lse[index].float()  # [B, Q, Hq, D], [B, Q, Hq]
    sel = selected.long()
    pages = torch.gather(bank_table.long(), 1, sel.clamp(min=0).reshape(batch, -1)).reshape(batch, num_kv_heads, top_k)
    pages = pages.clamp(min=0)
    first = sink_blocks * block_size  # selected slot i, token o sits at first + i * block_size + o
    positions = torch.arange(first, first + top_k * block_size, device=dev)
    for h in range(num_kv_heads):
        k = k_cache[pages[:, h], :, h].float()  # [B, K, bs, D]
        if k_scale is not None:
            k = k * (k_scale if k_scale.dim() == 0 else k_scale[h]).float()
        if rope_cos_sin is not None:
            k = apply_rotary(k.reshape(batch, -1, head_dim).transpose(0, 1), rope_cos_sin, positions, rope_neox)
            k = k.transpose(0, 1).reshape(batch, top_k, block_size, head_dim)
        heads = slice(h * group, (h + 1) * group)
        s = torch.einsum("bqgd,bknd->bqgkn", qs[:, :, heads], k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = torch.exp(s - ls[:, :, heads, None, None])
        p = torch.where(real[:, :, None, None, None], p, torch.zeros_like(p))
        mass = p.sum(dim=(1, 2, 4))  # [B, K]
        mass = torch.where(sel[:, h] >= 0, mass, torch.zeros_like(mass))
        block_mass[:, h].scatter_add_(1, sel[:, h].clamp(min=0), mass)
    return block_mass
