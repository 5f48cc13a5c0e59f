"""Triton exact merge of two partial attention states (out, lse) over disjoint key sets."""

from __future__ import annotations

import triton
import triton.language as tl

from kvmem.ops import _triton as _cfg

__all__ = ["merge_states"]


# lse strides may be 1 or anything: not value-specialised, like num_heads, so the compiled variant
# is the one tools/aot_compile_triton.py compiles (out strides and head_dim keep the /16 hint).
@triton.jit(do_not_specialize=["num_heads", "stride_lt", "stride_lh", "stride_lat", "stride_lah", "stride_lbt",
                               "stride_lbh"])
def _merge_states_kernel(
    out_ptr,
    lse_ptr,
    a_ptr,
    lse_a_ptr,
    b_ptr,
    lse_b_ptr,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_at,
    stride_ah,
    stride_lat,
    stride_lah,
    stride_bt,
    stride_bh,
    stride_lbt,
    stride_lbh,
    num_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < num_heads
    mask = h_ok[:, None] & (offs_d < head_dim)[None, :]
    la = tl.load(lse_a_ptr + t * stride_lat + offs_h * stride_lah, mask=h_ok,
                 other=float("-inf")).to(tl.float32)
    lb = tl.load(lse_b_ptr + t * stride_lbt + offs_h * stride_lbh, mask=h_ok,
                 other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    ok = m > float("-inf")
    m_safe = tl.where(ok, m, 0.0)
    wa = tl.exp(la - m_safe)  # 0 for an empty partial
    wb = tl.exp(lb - m_safe)
    denom = wa + wb
    inv = tl.where(ok, 1.0 / tl.where(ok, denom, 1.0), 0.0)
    wa = wa * inv
    wb = wb * inv
    # Skip reading a partial that contributes nothing (it may hold NaN).
    oa = tl.load(a_ptr + t * stride_at + (offs_h * stride_ah)[:, None] + offs_d[None, :],
                 mask=mask & (wa > 0.0)[:, None], other=0.0).to(tl.float32)
    ob = tl.load(b_ptr + t * stride_bt + (offs_h * stride_bh)[:, None] + offs_d[None, :],
                 mask=mask & (wb > 0.0)[:, None], other=0.0).to(tl.float32)
    o = oa * wa[:, None] + ob * wb[:, None]
    tl.store(out_ptr + t * stride_ot + (offs_h * stride_oh)[:, None] + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(ok, m_safe + tl.log(tl.where(ok, denom, 1.0)), float("-inf"))
    tl.store(lse_ptr + t * stride_lt + offs_h * stride_lh, lse, mask=h_ok)


def merge_states(out, lse, out_a, lse_a, out_b, lse_b) -> None:
    """``out``/``lse`` = exact merge of (``out_a``, ``lse_a``) and (``out_b``, ``lse_b``);
    outs [T, H, D] (unit last stride), lses [T, H] fp32."""
    assert out.dim() == 3 and out_a.shape == out.shape and out_b.shape == out.shape
    assert out.stride(-1) == 1 and out_a.stride(-1) == 1 and out_b.stride(-1) == 1
    num_tokens, num_heads, head_dim = out.shape
    if num_tokens == 0:
        return
    bd = _cfg.block_d(head_dim)
    bh = _cfg.reduce_block_h(bd)
    grid = (num_tokens, triton.cdiv(num_heads, bh))
    _merge_states_kernel[grid](
        out, lse, out_a, lse_a, out_b, lse_b,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        out_a.stride(0), out_a.stride(1), lse_a.stride(0), lse_a.stride(1),
        out_b.stride(0), out_b.stride(1), lse_b.stride(0), lse_b.stride(1),
        num_heads, head_dim,
        BLOCK_H=bh, BLOCK_D=bd, num_warps=4,
    )


AOT_KERNELS = {"merge_states": _merge_states_kernel}  # for tools/aot_compile_triton.py


def aot_variants(arch: int = 80):
    """Every variant of the kernel the launcher can pick (one per dtype and BLOCK_D)."""
    del arch
    for dtype in _cfg.DTYPES:
        dn = _cfg.DTYPE_NAMES[dtype]
        for bd in _cfg.block_ds():
            yield _cfg.AotVariant("merge_states", dn, (("BLOCK_H", _cfg.reduce_block_h(bd)), ("BLOCK_D", bd)), 4, 3)
