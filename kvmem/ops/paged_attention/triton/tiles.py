"""Device helpers shared by the Triton paged-attention kernels (K/V tile gather, scores, one
online-softmax step).

The K/V load transform, written once here for every attention kernel: :func:`_load_kv_tile`
gathers a tile and decodes a float8 cache in registers (``FORMAT``: kvmem/ops/triton_fp8.py),
:func:`_rope_k_tile` rotates keys (RoPE on load, after the decode), :func:`_kv_scales` gives the
dequantisation factors. Dequantisation is ``decode(bits) * scale[kv head]``; since one program
reads one KV head, the scale is a scalar there and, by linearity, is applied to the scores
(``q.k * k_scale``, folded into the score scale) and to the output (``acc * v_scale``) rather
than to each element: the tiles stay exact in the query's dtype (every float8 value is), so a
quantised cache costs no extra rounding and no per-element multiply. A float cache of another
dtype than q is converted on load (keys then split in two dots when q is 16-bit, see
:func:`_scores`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvmem.ops._triton import interpreting
from kvmem.ops.triton_fp8 import fp8_decode_f16

# Triton's interpreter (3.6 and 3.9) multiplies bf16 operands of tl.dot as their uint16 bit
# patterns; when interpreting, bf16 dots run on exactly-upcast fp32 operands instead (same
# products, fp32 accumulation, as the tensor cores). Compiled code is unaffected.
_INTERPRET_BF16_DOT = tl.constexpr(interpreting())


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
    FORMAT: tl.constexpr,
):
    """Gather a [BLOCK_N, BLOCK_D] tile of keys (or values) at logical positions ``n``.

    ``n_ok`` masks keys (and their block-table entries) that must not be read; masked rows
    and padded head-dim columns come back as 0. A float cache's tile comes in the cache's dtype;
    a float8 cache's (uint8 codes, ``FORMAT`` e4m3/e5m2) as fp16 values times
    ``triton_fp8.F16_UNIT[FORMAT]`` (exact; :func:`_kv_scales` folds the unit back in).
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
        x = tl.load(ptrs, mask=n_ok[:, None] & (offs_d < head_dim)[None, :], other=0)
    else:
        x = tl.load(ptrs, mask=(offs_d < head_dim)[None, :], other=0)
    if FORMAT != 0:
        x = fp8_decode_f16(x, FORMAT)
    return x


@triton.jit
def _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, stride_k_scale, stride_v_scale, HAS_SCALE: tl.constexpr,
               FORMAT: tl.constexpr):
    """(k factor, v factor) of KV head ``kv_head``: its dequantisation scales (1 without) times
    the inverse of the tile unit of :func:`_load_kv_tile` (2^8 for e4m3, else 1). The keys'
    factor multiplies the scores, the values' the output."""
    if HAS_SCALE:
        ks = tl.load(k_scale_ptr + kv_head * stride_k_scale)  # strides: 0 (0-d scale) or 1 ([Hkv])
        vs = tl.load(v_scale_ptr + kv_head * stride_v_scale)
    else:
        ks = tl.full([], 1.0, tl.float32)
        vs = tl.full([], 1.0, tl.float32)
    if FORMAT == 1:
        ks = ks * 256.0
        vs = vs * 256.0
    return ks, vs


@triton.jit
def _rope_k_tile(
    k,
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
    rope_ptr,
    stride_rope,
    rot_dim,
    MASK_N: tl.constexpr,
    ROPE_NEOX: tl.constexpr,
    FORMAT: tl.constexpr,
):
    """RoPE on load: the key tile ``k`` (from :func:`_load_kv_tile` with the same arguments)
    rotated in fp32, key ``n`` at position ``n`` (row ``n`` of ``rope_ptr``: cos half, sin half).

    ``k_rot[:, d] = k[:, d] * cos_d + sign_d * sin_d * k[:, partner_d]`` with the pairs
    ``(i, i + rot/2)`` (NeoX: partner ``d +- rot/2``, sign -1 on the first half) or ``(2i, 2i+1)``
    (GPT-J: partner ``d ^ 1``, sign -1 on even channels); channels past ``rot_dim`` pass through.
    The partner columns are a second gather of the same (cached) rows.
    """
    half = rot_dim // 2
    in_rot = offs_d < rot_dim
    if ROPE_NEOX:
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        pair = tl.where(first, offs_d, offs_d - half)
    else:
        first = (offs_d % 2) == 0
        partner = offs_d ^ 1
        pair = offs_d // 2
    partner = tl.where(in_rot, partner, offs_d)
    pair = tl.where(in_rot, pair, 0)
    x_partner = _load_kv_tile(cache_ptr, bt_row_ptr, n, n_ok, partner, page_size, stride_b, stride_s,
                              head_off, rot_dim, MASK_N, FORMAT).to(tl.float32)
    if MASK_N:
        cs_ok = n_ok[:, None] & in_rot[None, :]
    else:
        cs_ok = in_rot[None, :] & (n >= 0)[:, None]
    cs_row = rope_ptr + n.to(tl.int64)[:, None] * stride_rope
    cos = tl.load(cs_row + pair[None, :], mask=cs_ok, other=1.0)
    sin = tl.load(cs_row + (pair + half)[None, :], mask=cs_ok, other=0.0)
    sin = tl.where(first[None, :], -sin, sin)
    return k.to(tl.float32) * cos + x_partner * sin


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
def _scores(q, k, qk_scale, softcap_in, softcap_out, SOFTCAP: tl.constexpr, FP32: tl.constexpr,
            SPLIT_K: tl.constexpr = False):
    """Scores in log2 units: ``scale*q.k*log2e`` or ``c*tanh(scale*q.k/c)*log2e``.

    ``SPLIT_K`` (keys not exact in q's low-precision dtype: rotated fp32 keys of RoPE on load, a
    float cache of another dtype): ``k = k_hi + k_lo``, both in q's dtype, and
    ``q.k = q.k_hi + q.k_lo`` (two tensor-core dots, ~16 mantissa bits of k), so the keys are not
    rounded to q's dtype before the product.
    """
    if SPLIT_K:
        k_hi = k.to(q.dtype)
        k_lo = (k - k_hi.to(tl.float32)).to(q.dtype)
        qk = _dot(q, tl.trans(k_hi), FP32) + _dot(q, tl.trans(k_lo), FP32)
    else:
        qk = _dot(q, tl.trans(k.to(q.dtype)), FP32)
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
