"""Triton paged attention: a varlen prefill kernel and a split-K decode kernel.

Both kernels work in the base-2 domain: a score ``s`` (natural-log units) is kept as
``s * log2(e)`` so that ``exp`` becomes ``exp2``; the lse is converted back to natural log on
store.  Keys are gathered per key: key ``n`` of a sequence lives in physical block
``block_table[b, n // page_size]`` at offset ``n % page_size``, so the key tile (``BLOCK_N``)
is independent of the page size (1..256).

NaN safety: the block table is loaded only for keys that may be visible, masked K/V rows are
loaded as 0 (so ``0 * v`` never meets a NaN) and masked scores are set to ``-inf`` with
``tl.where``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs as _cfg

LOG2E = 1.4426950408889634

# Triton's interpreter (3.6 and 3.9) multiplies bf16 operands of tl.dot as their uint16 bit
# patterns; when interpreting, bf16 dots run on exactly-upcast fp32 operands instead (same
# products, fp32 accumulation, as the tensor cores). Compiled code is unaffected.
_INTERPRET_BF16_DOT = tl.constexpr(_cfg.interpreting())

__all__ = ["paged_attention"]


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(
    cache_ptr,
    bt_row_ptr,
    n,
    n_ok,
    offs_d,
    page_size,
    stride_b,
    stride_s,
    head_off,
    head_dim,
    MASK_N: tl.constexpr,
):
    """Gather a [BLOCK_N, BLOCK_D] tile of keys (or values) at logical positions ``n``.

    ``n_ok`` masks keys (and their block-table entries) that must not be read; masked rows
    and padded head-dim columns come back as 0.
    """
    blk_idx = n // page_size
    slot = n - blk_idx * page_size
    if MASK_N:
        blk = tl.load(bt_row_ptr + blk_idx, mask=n_ok, other=0)
    else:
        blk = tl.load(bt_row_ptr + blk_idx)
    row_off = blk.to(tl.int64) * stride_b + slot.to(tl.int64) * stride_s + head_off
    ptrs = cache_ptr + (row_off[:, None] + offs_d[None, :])
    if MASK_N:
        x = tl.load(ptrs, mask=n_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    return x


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        r = tl.dot(a, b, input_precision="ieee")
    elif _INTERPRET_BF16_DOT and a.dtype == tl.bfloat16:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _scores(q, k, qk_scale, softcap_in, softcap_out, SOFTCAP: tl.constexpr, FP32: tl.constexpr):
    """Scores in log2 units: ``scale*q.k*log2e`` or ``c*tanh(scale*q.k/c)*log2e``."""
    qk = _dot(q, tl.trans(k), FP32)
    if SOFTCAP:  # constexpr: a runtime branch here breaks triton 3.6's sm90 pipeliner
        # tanh(x) = 1 - 2 / (exp(2x) + 1); saturates correctly at +-inf.
        x = qk * softcap_in
        t = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)
        s = t * softcap_out
    else:
        s = qk * qk_scale
    return s


@triton.jit
def _online_softmax_step(
    s, v, m_i, l_i, acc, FP32: tl.constexpr,
):
    """One flash-attention update; rows whose scores are all -inf stay (m=-inf, l=0, acc=0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc += _dot(p.to(v.dtype), v, FP32)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------
# Prefill (varlen, one query head per program, BLOCK_M queries per program)
# --------------------------------------------------------------------------------------------


# Runtime flags, sizes and the strides that may be 1 or any value (block table rows, lse) are not
# value-specialised (the JIT would make an argument equal to 1 a constant and mark multiples of
# 16), so the variants that run are exactly the ones tools/aot_compile_triton.py compiles; the
# strides over head_dim-sized rows and head_dim itself are multiples of 16 for every supported
# head dim and keep the /16 hint (the AOT tool marks them too).
@triton.jit(do_not_specialize=["num_seqs", "num_tiles", "group", "page_size", "window", "causal",
                               "has_sink", "write_lse", "stride_bt", "stride_lt", "stride_lh"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    num_seqs,
    num_tiles,
    group,
    page_size,
    qk_scale,
    softcap_in,
    softcap_out,
    window,
    causal,
    has_sink,
    write_lse,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
):
    # Later tiles of a sequence carry more causal work: hand them out first.
    pid = num_tiles - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group

    # Sequence b owns tiles [cu[b] // BLOCK_M + b, cu[b+1] // BLOCK_M + b + 1) (a superset of
    # its cdiv(q_len, BLOCK_M) tiles); find b = #{b : start_b <= pid} - 1.
    count = tl.program_id(0) * 0
    for c in range(0, num_seqs, SEARCH_BLOCK):
        idx = c + tl.arange(0, SEARCH_BLOCK)
        cu = tl.load(cu_q_ptr + idx, mask=idx < num_seqs, other=0)
        start = cu // BLOCK_M + idx
        count += tl.sum(((start <= pid) & (idx < num_seqs)).to(tl.int32), 0)
    b = count - 1
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = (pid - (q_start // BLOCK_M + b)) * BLOCK_M

    if m0 < q_len:
        kv_len = tl.load(seq_lens_ptr + b)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < q_len
        pos = kv_len - q_len + offs_m  # query positions
        m_end = tl.minimum(m0 + BLOCK_M, q_len)
        p_min = kv_len - q_len + m0
        p_max = kv_len - q_len + m_end - 1

        q_rows = (q_start + offs_m).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
        q_ptrs = q_ptr + (q_rows[:, None] + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)

        # Visible key range of this tile and its fully-visible (unmasked) middle part.
        hi = kv_len
        full_hi = kv_len
        if causal != 0:
            hi = tl.minimum(hi, p_max + 1)
            full_hi = tl.minimum(full_hi, p_min + 1)
        lo = kv_len * 0
        full_lo = kv_len * 0
        if window > 0:
            lo = tl.maximum(0, p_min - window + 1)
            full_lo = tl.maximum(0, p_max - window + 1)
        hi = tl.maximum(hi, lo)
        start = (lo // BLOCK_N) * BLOCK_N
        end = tl.cdiv(hi, BLOCK_N) * BLOCK_N
        a = tl.minimum(tl.cdiv(tl.maximum(full_lo, lo), BLOCK_N) * BLOCK_N, end)
        bb = tl.maximum(a, (full_hi // BLOCK_N) * BLOCK_N)
        bb = tl.minimum(bb, end)

        if has_sink != 0:
            sink = tl.load(sink_ptr + head).to(tl.float32) * 1.4426950408889634
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        else:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        k_head = kv_head.to(tl.int64) * stride_kh
        v_head = kv_head.to(tl.int64) * stride_vh

        # Interior tiles: every key visible to every (real) query row.
        for n0 in range(a, bb, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k = _load_kv_tile(k_ptr, bt_row, n, n < hi, offs_d, page_size, stride_kb, stride_ks,
                              k_head, head_dim, False)
            s = _scores(q, k.to(q.dtype), qk_scale, softcap_in, softcap_out, SOFTCAP, FP32)
            v = _load_kv_tile(v_ptr, bt_row, n, n < hi, offs_d, page_size, stride_vb, stride_vs,
                              v_head, head_dim, False)
            m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, FP32)

        # Edge tiles [start, a) and [bb, end): masked.
        n_lead = (a - start) // BLOCK_N
        n_edge = n_lead + (end - bb) // BLOCK_N
        for t in range(0, n_edge):
            n0 = tl.where(t < n_lead, start + t * BLOCK_N, bb + (t - n_lead) * BLOCK_N)
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (n >= lo) & (n < hi)
            k = _load_kv_tile(k_ptr, bt_row, n, n_ok, offs_d, page_size, stride_kb, stride_ks,
                              k_head, head_dim, True)
            s = _scores(q, k.to(q.dtype), qk_scale, softcap_in, softcap_out, SOFTCAP, FP32)
            vis = n_ok[None, :] & row_ok[:, None]
            if causal != 0:
                vis = vis & (n[None, :] <= pos[:, None])
            if window > 0:
                vis = vis & (n[None, :] > pos[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
            v = _load_kv_tile(v_ptr, bt_row, n, n_ok, offs_d, page_size, stride_vb, stride_vs,
                              v_head, head_dim, True)
            m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, FP32)

        l_ok = l_i > 0.0
        inv_l = tl.where(l_ok, 1.0 / tl.where(l_ok, l_i, 1.0), 0.0)
        o = acc * inv_l[:, None]
        o_rows = (q_start + offs_m).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        o_ptrs = out_ptr + (o_rows[:, None] + offs_d[None, :])
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
        if write_lse != 0:
            lse = tl.where(l_ok, (m_i + tl.log2(tl.where(l_ok, l_i, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            l_rows = (q_start + offs_m).to(tl.int64) * stride_lt + head.to(tl.int64) * stride_lh
            tl.store(lse_ptr + l_rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Decode (split-K): the G query heads (x small q_len) of one KV head share each K/V tile
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_row_chunks", "group", "page_size", "num_splits", "window", "causal",
                               "has_sink", "write_lse", "stride_bt", "stride_lt", "stride_lh", "stride_pls",
                               "stride_plt"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_pls,
    stride_plt,
    num_row_chunks,
    group,
    page_size,
    num_splits,
    qk_scale,
    softcap_in,
    softcap_out,
    window,
    causal,
    has_sink,
    write_lse,
    head_dim,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32: tl.constexpr,
):
    b = tl.program_id(0)
    pid1 = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = pid1 // num_row_chunks
    chunk = pid1 - kv_head * num_row_chunks

    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    kv_len = tl.load(seq_lens_ptr + b)

    # Row r of the tile is query (r // group) of the sequence, head kv_head*group + r % group.
    r = chunk * ROWS + tl.arange(0, ROWS)
    qi = r // group
    heads = kv_head * group + (r - qi * group)
    row_ok = qi < q_len
    pos = kv_len - q_len + qi
    offs_d = tl.arange(0, BLOCK_D)
    tok = (q_start + qi).to(tl.int64)

    q_ptrs = q_ptr + (tok * stride_qt + heads.to(tl.int64) * stride_qh)[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)

    # Keys any query of the sequence may see, cut into tiles, then into splits.
    lo = kv_len * 0
    if window > 0:
        lo = tl.maximum(0, kv_len - q_len - window + 1)
    hi = kv_len
    if chunk * ROWS >= q_len * group:  # no query row of this sequence in this chunk
        hi = lo
    hi = tl.maximum(hi, lo)
    tile_lo = lo // BLOCK_N
    n_tiles = tl.cdiv(hi, BLOCK_N) - tile_lo
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = tile_lo + split * per_split
    t_end = tl.minimum(t_begin + per_split, tile_lo + n_tiles)

    direct = num_splits == 1
    m_i = tl.zeros([ROWS], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if direct:
        if has_sink != 0:
            sink = tl.load(sink_ptr + heads, mask=row_ok, other=0.0).to(tl.float32)
            m_i = sink * 1.4426950408889634
            l_i += 1.0
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_head = kv_head.to(tl.int64) * stride_kh
    v_head = kv_head.to(tl.int64) * stride_vh
    for t in range(t_begin, t_end):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n >= lo) & (n < hi)
        k = _load_kv_tile(k_ptr, bt_row, n, n_ok, offs_d, page_size, stride_kb, stride_ks,
                          k_head, head_dim, True)
        s = _scores(q, k.to(q.dtype), qk_scale, softcap_in, softcap_out, SOFTCAP, FP32)
        vis = n_ok[None, :] & row_ok[:, None]
        if causal != 0:
            vis = vis & (n[None, :] <= pos[:, None])
        if window > 0:
            vis = vis & (n[None, :] > pos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        v = _load_kv_tile(v_ptr, bt_row, n, n_ok, offs_d, page_size, stride_vb, stride_vs,
                          v_head, head_dim, True)
        m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, FP32)

    l_ok = l_i > 0.0
    inv_l = tl.where(l_ok, 1.0 / tl.where(l_ok, l_i, 1.0), 0.0)
    o = acc * inv_l[:, None]
    lse = tl.where(l_ok, (m_i + tl.log2(tl.where(l_ok, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    hh = heads.to(tl.int64)
    if direct:
        o_ptrs = out_ptr + (tok * stride_ot + hh * stride_oh)[:, None] + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
        if write_lse != 0:
            tl.store(lse_ptr + tok * stride_lt + hh * stride_lh, lse, mask=row_ok)
    else:
        sp = split.to(tl.int64)
        p_ptrs = (part_out_ptr + sp * stride_ps
                  + (tok * stride_pt + hh * stride_ph)[:, None] + offs_d[None, :])
        tl.store(p_ptrs, o, mask=o_mask)
        tl.store(part_lse_ptr + sp * stride_pls + tok * stride_plt + hh, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_heads", "num_splits", "has_sink", "write_lse", "stride_pls", "stride_plt",
                               "stride_lt", "stride_lh"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    cu_q_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_pls,
    stride_plt,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    num_heads,
    head_dim,
    num_splits,
    has_sink,
    write_lse,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if i < q_len:
        tok = (q_start + i).to(tl.int64)
        offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_ok = offs_h < num_heads
        hd_ok = h_ok[:, None] & (offs_d < head_dim)[None, :]
        hh = offs_h.to(tl.int64)

        plse_ptrs = part_lse_ptr + tok * stride_plt + hh
        pout_ptrs = part_out_ptr + tok * stride_pt + (hh * stride_ph)[:, None] + offs_d[None, :]
        m = tl.zeros([BLOCK_H], dtype=tl.float32) + float("-inf")
        if has_sink != 0:
            m = tl.load(sink_ptr + offs_h, mask=h_ok, other=float("-inf")).to(tl.float32)
        p = plse_ptrs
        for s in range(0, num_splits):
            m = tl.maximum(m, tl.load(p, mask=h_ok, other=float("-inf")))
            p += stride_pls
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.zeros([BLOCK_H], dtype=tl.float32)
        if has_sink != 0:
            sk = tl.load(sink_ptr + offs_h, mask=h_ok, other=float("-inf")).to(tl.float32)
            denom += tl.exp(sk - m_safe)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for s in range(0, num_splits):
            w = tl.exp(tl.load(plse_ptrs, mask=h_ok, other=float("-inf")) - m_safe)
            po = tl.load(pout_ptrs, mask=hd_ok & (w > 0.0)[:, None], other=0.0)
            acc += po * w[:, None]
            denom += w
            plse_ptrs += stride_pls
            pout_ptrs += stride_ps
        d_ok = denom > 0.0
        inv = tl.where(d_ok, 1.0 / tl.where(d_ok, denom, 1.0), 0.0)
        o = acc * inv[:, None]
        tl.store(out_ptr + tok * stride_ot + (hh * stride_oh)[:, None] + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=hd_ok)
        if write_lse != 0:
            lse = tl.where(d_ok, m_safe + tl.log(tl.where(d_ok, denom, 1.0)), float("-inf"))
            tl.store(lse_ptr + tok * stride_lt + hh * stride_lh, lse, mask=h_ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _score_params(scale: float, softcap: float):
    if softcap is not None and softcap > 0:
        return scale * LOG2E, scale / softcap, softcap * LOG2E, True
    return scale * LOG2E, 1.0, 1.0, False


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=t.device)


def launch_prefill(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                   max_seqlen_q, scale, causal, window, softcap, sink_logits, cfg=None):
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    page_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qk_scale, sc_in, sc_out, use_softcap = _score_params(scale, softcap)
    fp32 = q.dtype == torch.float32
    has_sink = sink_logits is not None
    write_lse = lse is not None
    sink = sink_logits if has_sink else _dummy(q)
    lse_t = lse if write_lse else _dummy(q)
    lse_strides = (lse.stride(0), lse.stride(1)) if write_lse else (0, 0)
    block_d = _cfg.block_d(head_dim)

    def launch(c: _cfg.PrefillConfig):
        num_tiles = num_tokens // c.block_m + num_seqs
        grid = (num_tiles, num_heads)
        _prefill_kernel[grid](
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, sink, out, lse_t,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0),
            out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
            num_seqs, num_tiles, group, page_size,
            qk_scale, sc_in, sc_out, int(window) if window and window > 0 else 0,
            1 if causal else 0, 1 if has_sink else 0, 1 if write_lse else 0, head_dim,
            BLOCK_D=block_d, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            SOFTCAP=use_softcap, FP32=fp32, SEARCH_BLOCK=_cfg.SEARCH_BLOCK,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    if cfg is None:
        arch = _cfg.arch_of(q.device)
        cfg = _cfg.tuned(
            "prefill", _cfg.prefill_key(q.dtype, head_dim, group, page_size, max_seqlen_q, arch),
            _cfg.prefill_configs(q.dtype, block_d, arch),
            _cfg.prefill_heuristic(q.dtype, block_d, arch, max_seqlen_q), launch, q.device)
    launch(cfg)


def launch_decode(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                  max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                  cfg=None, num_splits=None):
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    page_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qk_scale, sc_in, sc_out, use_softcap = _score_params(scale, softcap)
    fp32 = q.dtype == torch.float32
    has_sink = sink_logits is not None
    write_lse = lse is not None
    sink = sink_logits if has_sink else _dummy(q)
    lse_t = lse if write_lse else _dummy(q)
    lse_strides = (lse.stride(0), lse.stride(1)) if write_lse else (0, 0)
    block_d = _cfg.block_d(head_dim)
    rows = _cfg.decode_rows(group * max(1, max_seqlen_q), q.dtype, block_d)
    num_row_chunks = triton.cdiv(group * max(1, max_seqlen_q), rows)

    def launch(c: _cfg.DecodeConfig, splits=None):
        if splits is None:
            splits = _cfg.decode_num_splits(num_seqs, num_kv_heads * num_row_chunks,
                                            max_seqlen_k, c.block_n, q.device)
        if splits > 1:
            part_out = torch.empty((splits, num_tokens, num_heads, head_dim), dtype=torch.float32,
                                   device=q.device)
            part_lse = torch.empty((splits, num_tokens, num_heads), dtype=torch.float32,
                                   device=q.device)
        else:
            part_out = part_lse = _dummy(q)
        ps = part_out.stride() if splits > 1 else (0, 0, 0, 1)
        pls = part_lse.stride() if splits > 1 else (0, 0, 1)
        grid = (num_seqs, num_kv_heads * num_row_chunks, splits)
        _decode_kernel[grid](
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, sink, out, lse_t,
            part_out, part_lse,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0),
            out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
            ps[0], ps[1], ps[2], pls[0], pls[1],
            num_row_chunks, group, page_size, splits,
            qk_scale, sc_in, sc_out, int(window) if window and window > 0 else 0,
            1 if causal else 0, 1 if has_sink else 0, 1 if write_lse else 0, head_dim,
            BLOCK_D=block_d, ROWS=rows, BLOCK_N=c.block_n,
            SOFTCAP=use_softcap, FP32=fp32,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
        if splits > 1:
            block_h = _cfg.reduce_block_h(block_d)
            rgrid = (num_seqs, max(1, max_seqlen_q), triton.cdiv(num_heads, block_h))
            _decode_reduce_kernel[rgrid](
                part_out, part_lse, cu_seqlens_q, sink, out, lse_t,
                ps[0], ps[1], ps[2], pls[0], pls[1],
                out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
                num_heads, head_dim, splits, 1 if has_sink else 0, 1 if write_lse else 0,
                BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
            )

    if cfg is None:
        arch = _cfg.arch_of(q.device)
        cfg = _cfg.tuned(
            "decode", _cfg.decode_key(q.dtype, head_dim, group, page_size, rows, arch),
            _cfg.decode_configs(q.dtype, block_d, arch, rows),
            _cfg.decode_heuristic(q.dtype, block_d, arch, rows), lambda c: launch(c, num_splits),
            q.device)
    launch(cfg, num_splits)


def paged_attention(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
                    window: int, softcap: float, sink_logits) -> None:
    """Write attention of ``q`` over the paged caches into ``out`` (and ``lse`` if not None).

    ``window <= 0`` / ``softcap <= 0`` (or None) mean none. Tokens not covered by
    ``cu_seqlens_q`` are left untouched. No host synchronisation.
    """
    assert q.dim() == 3 and k_cache.dim() == 4 and v_cache.dim() == 4
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert out.stride(-1) == 1 and block_table.stride(-1) == 1
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if _cfg.use_decode(max_seqlen_q, group):
        launch_decode(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                      max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits)
    else:
        launch_prefill(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                       max_seqlen_q, scale, causal, window, softcap, sink_logits)


AOT_KERNELS = {"prefill": _prefill_kernel, "decode": _decode_kernel, "decode_reduce": _decode_reduce_kernel}
aot_variants = _cfg.aot_variants  # for tools/aot_compile_triton.py
