"""Triton split-K decode kernel and its reduction (see the package docstring)."""

from __future__ import annotations

import triton
import triton.language as tl

from kvmem.ops.paged_attention.triton.tiles import (_kv_scales, _load_kv_tile, _online_softmax_step, _rope_k_tile,
                                                    _scores)

# --------------------------------------------------------------------------------------------
# Decode (split-K): the G query heads (x small q_len) of one KV head share each K/V tile
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_row_chunks", "group", "page_size", "num_splits", "window", "causal",
                               "has_sink", "write_lse", "stride_rope", "rot_dim", "stride_k_scale", "stride_v_scale",
                               "stride_bt", "stride_lt",
                               "stride_lh", "stride_pls", "stride_plt"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    sink_ptr,
    rope_ptr,
    k_scale_ptr,
    v_scale_ptr,
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
    stride_rope,
    rot_dim,
    stride_k_scale,
    stride_v_scale,
    head_dim,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_NEOX: tl.constexpr,
    FORMAT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
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
    # The load transform (tiles.py): float8 decode in _load_kv_tile, the scales on scores and output.
    k_fac, v_fac = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, stride_k_scale, stride_v_scale, HAS_SCALE, FORMAT)
    qk_scale = qk_scale * k_fac
    softcap_in = softcap_in * k_fac
    # keys not exact in q's 16-bit dtype (rotated, or a float cache of another dtype): two dots
    SPLIT_K: tl.constexpr = (ROPE or (FORMAT == 0 and k_ptr.dtype.element_ty != q_ptr.dtype.element_ty)) and \
        not FP32
    for t in range(t_begin, t_end):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n >= lo) & (n < hi)
        k = _load_kv_tile(k_ptr, bt_row, n, n_ok, offs_d, page_size, stride_kb, stride_ks,
                          k_head, head_dim, True, FORMAT)
        if ROPE:  # RoPE on load: key n rotated at position n, fp32
            k = _rope_k_tile(k, k_ptr, bt_row, n, n_ok, offs_d, page_size, stride_kb, stride_ks, k_head,
                             head_dim, rope_ptr, stride_rope, rot_dim, True, ROPE_NEOX, FORMAT)
        s = _scores(q, k, qk_scale, softcap_in, softcap_out, SOFTCAP, FP32, SPLIT_K)
        vis = n_ok[None, :] & row_ok[:, None]
        if causal != 0:
            vis = vis & (n[None, :] <= pos[:, None])
        if window > 0:
            vis = vis & (n[None, :] > pos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        v = _load_kv_tile(v_ptr, bt_row, n, n_ok, offs_d, page_size, stride_vb, stride_vs,
                          v_head, head_dim, True, FORMAT)
        m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, FP32)

    l_ok = l_i > 0.0
    inv_l = tl.where(l_ok, 1.0 / tl.where(l_ok, l_i, 1.0), 0.0)
    o = acc * (inv_l * v_fac)[:, None]
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
