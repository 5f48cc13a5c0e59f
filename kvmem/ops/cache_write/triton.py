"""Triton scatter of new keys/values into the paged caches."""

from __future__ import annotations

import triton
import triton.language as tl

from kvmem.ops import _triton as _cfg

__all__ = ["cache_write"]


@triton.jit(do_not_specialize=["num_kv_heads", "page_size"])
def _cache_write_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    num_kv_heads,
    head_dim,
    page_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // page_size
        off = slot - blk * page_size
        offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
        k = tl.load(k_ptr + t * stride_kt + (offs_h * stride_kh)[:, None] + offs_d[None, :],
                    mask=mask)
        v = tl.load(v_ptr + t * stride_vt + (offs_h * stride_vh)[:, None] + offs_d[None, :],
                    mask=mask)
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs
        tl.store(kc + (offs_h * stride_kch)[:, None] + offs_d[None, :],
                 k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + (offs_h * stride_vch)[:, None] + offs_d[None, :],
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def cache_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Scatter ``k``/``v`` [num_tokens, Hkv, D] into ``k_cache``/``v_cache``
    [num_blocks, block_size, Hkv, D] at ``slot_mapping`` (int32/int64, -1 skips), in place."""
    assert k.dim() == 3 and v.dim() == 3 and k_cache.dim() == 4 and v_cache.dim() == 4
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    bd = _cfg.block_d(head_dim)
    bh = _cfg.reduce_block_h(bd)
    grid = (num_tokens, triton.cdiv(num_kv_heads, bh))
    _cache_write_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=bh, BLOCK_D=bd, num_warps=4,
    )


AOT_KERNELS = {"cache_write": _cache_write_kernel}  # for tools/aot_compile_triton.py


def aot_variants(arch: int = 80):
    """Every variant of the kernel the launcher can pick (one per dtype and BLOCK_D)."""
    del arch
    for dtype in _cfg.DTYPES:
        dn = _cfg.DTYPE_NAMES[dtype]
        for bd in _cfg.block_ds():
    # The launcher accepts any k/v dtype, but caches are written in their own dtype.
            yield _cfg.AotVariant("cache_write", dn, (("BLOCK_H", _cfg.reduce_block_h(bd)), ("BLOCK_D", bd)), 4, 3, src_dtype=dn)
