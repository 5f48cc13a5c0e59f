"""Triton varlen prefill kernel (one program per query block and head; see the package
docstring)."""

from __future__ import annotations

import triton
import triton.language as tl

from kvmem.ops.paged_attention.triton.tiles import (_kv_scales, _load_kv_tile, _online_softmax_step, _rope_k_tile,
                                                    _scores)

# --------------------------------------------------------------------------------------------
# Prefill (varlen, one query head per program, BLOCK_M queries per program)
# --------------------------------------------------------------------------------------------


# Runtime flags, sizes and the strides that may be 1 or any value (block table rows, lse) are not
# value-specialised (the JIT would make an argument equal to 1 a constant and mark multiples of
# 16), so the variants that run are exactly the ones tools/aot_compile_triton.py compiles; the
# strides over head_dim-sized rows and head_dim itself are multiples of 16 for every supported
# head dim and keep the /16 hint (the AOT tool marks them too).
@triton.jit(do_not_specialize=["num_seqs", "num_tiles", "group", "page_size", "window", "causal",
                               "has_sink", "write_lse", "stride_rope", "rot_dim", "stride_k_scale", "stride_v_scale",
                               "stride_bt", "stride_lt",
                               "stride_lh"])
def _prefill_kernel(
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
    stride_rope,
    rot_dim,
    stride_k_scale,
    stride_v_scale,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP32: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_NEOX: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    FORMAT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
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
        # The load transform (tiles.py): float8 decode in _load_kv_tile, the scales on scores and output.
        k_fac, v_fac = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, stride_k_scale, stride_v_scale, HAS_SCALE, FORMAT)
        qk_scale = qk_scale * k_fac
        softcap_in = softcap_in * k_fac
        # keys not exact in q's 16-bit dtype (rotated, or a float cache of another dtype): two dots
        SPLIT_K: tl.constexpr = (ROPE or (FORMAT == 0 and k_ptr.dtype.element_ty != q_ptr.dtype.element_ty)) and \
        not FP32

        # Interior tiles: every key visible to every (real) query row.
        for n0 in range(a, bb, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k = _load_kv_tile(k_ptr, bt_row, n, n < hi, offs_d, page_size, stride_kb, stride_ks,
                              k_head, head_dim, False, FORMAT)
            if ROPE:  # RoPE on load: key n rotated at position n, fp32
                k = _rope_k_tile(k, k_ptr, bt_row, n, n < hi, offs_d, page_size, stride_kb, stride_ks, k_head,
                                 head_dim, rope_ptr, stride_rope, rot_dim, False, ROPE_NEOX, FORMAT)
            s = _scores(q, k, qk_scale, softcap_in, softcap_out, SOFTCAP, FP32, SPLIT_K)
            v = _load_kv_tile(v_ptr, bt_row, n, n < hi, offs_d, page_size, stride_vb, stride_vs,
                              v_head, head_dim, False, FORMAT)
            m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, FP32)

        # Edge tiles [start, a) and [bb, end): masked.
        n_lead = (a - start) // BLOCK_N
        n_edge = n_lead + (end - bb) // BLOCK_N
        for t in range(0, n_edge):
            n0 = tl.where(t < n_lead, start + t * BLOCK_N, bb + (t - n_lead) * BLOCK_N)
            n = n0 + tl.arange(0, BLOCK_N)
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
        o_rows = (q_start + offs_m).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        o_ptrs = out_ptr + (o_rows[:, None] + offs_d[None, :])
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
        if write_lse != 0:
            lse = tl.where(l_ok, (m_i + tl.log2(tl.where(l_ok, l_i, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            l_rows = (q_start + offs_m).to(tl.int64) * stride_lt + head.to(tl.int64) * stride_lh
            tl.store(lse_ptr + l_rows, lse, mask=row_ok)
