"""Triton scatter of new keys/values into the paged caches, encoded as the reference does
(kvmem's one cache encoding: ``kvmem/ops/triton_fp8.py``): float caches of any float dtype,
float8 caches (viewed as uint8) with their 0-d or per-KV-head scales."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmem.ops import _triton as _cfg
from kvmem.ops.triton_fp8 import encode_for_cache

__all__ = ["cache_write"]


@triton.jit(do_not_specialize=["stride_k_scale", "stride_v_scale", "num_kv_heads", "page_size"])
def _cache_write_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
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
    stride_k_scale,
    stride_v_scale,
    num_kv_heads,
    head_dim,
    page_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FORMAT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
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
        ks = 1.0
        vs = 1.0
        if HAS_SCALE:
            ks = tl.load(k_scale_ptr + offs_h * stride_k_scale, mask=offs_h < num_kv_heads, other=1.0)[:, None]
            vs = tl.load(v_scale_ptr + offs_h * stride_v_scale, mask=offs_h < num_kv_heads, other=1.0)[:, None]
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs
        tl.store(kc + (offs_h * stride_kch)[:, None] + offs_d[None, :],
                 encode_for_cache(k, ks, k_cache_ptr, FORMAT, HAS_SCALE), mask=mask)
        tl.store(vc + (offs_h * stride_vch)[:, None] + offs_d[None, :],
                 encode_for_cache(v, vs, v_cache_ptr, FORMAT, HAS_SCALE), mask=mask)


def cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Scatter ``k``/``v`` [num_tokens, Hkv, D] into ``k_cache``/``v_cache``
    [num_blocks, block_size, Hkv, D] at ``slot_mapping`` (int32/int64, -1 skips), in place.

    ``k_scale``/``v_scale`` (fp32, 0-d or [Hkv], both or neither; required by float8 caches):
    ``k / k_scale`` is stored. Any float k/v dtype; rounded to nearest even into the cache."""
    assert k.dim() == 3 and v.dim() == 3 and k_cache.dim() == 4 and v_cache.dim() == 4
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    bd = _cfg.block_d(head_dim)
    bh = _cfg.reduce_block_h(bd)
    grid = (num_tokens, triton.cdiv(num_kv_heads, bh))
    has_scale = k_scale is not None
    assert has_scale == (v_scale is not None)
    fmt = _cfg.cache_format(k_cache.dtype)
    assert has_scale or fmt == _cfg.FLOAT, "float8 caches need k_scale/v_scale"
    if has_scale:  # each 0-d (stride 0) or [Hkv] (stride 1)
        assert k_scale.dtype == v_scale.dtype == torch.float32
        strides = (1 if k_scale.dim() == 1 else 0, 1 if v_scale.dim() == 1 else 0)
    else:
        k_scale = v_scale = torch.empty(1, dtype=torch.float32, device=k.device)  # never read
        strides = (0, 0)
    _cache_write_kernel[grid](
        k, v, _cfg.storage(k_cache), _cfg.storage(v_cache), slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), strides[0], strides[1],
        num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=bh, BLOCK_D=bd, FORMAT=fmt, HAS_SCALE=has_scale, num_warps=4,
    )


AOT_KERNELS = {"cache_write": _cache_write_kernel}  # for tools/aot_compile_triton.py


def aot_variants(arch: int = 80):
    """The kernel's variants: per cache dtype and BLOCK_D, k/v in the cache's own dtype; float8
    caches (with scales) from each float dtype; a few cross-dtype and scaled float writes. The
    launcher takes any (k/v, cache) dtype pair: the JIT compiles the others on first use."""
    del arch

    def variant(src, dst, bd, fmt=_cfg.FLOAT, has_scale=False):
        ce = (("BLOCK_H", _cfg.reduce_block_h(bd)), ("BLOCK_D", bd), ("FORMAT", fmt), ("HAS_SCALE", has_scale))
        return _cfg.AotVariant("cache_write", dst, ce, 4, 3, src_dtype=src)

    for dtype in _cfg.DTYPES:
        dn = _cfg.DTYPE_NAMES[dtype]
        for bd in _cfg.block_ds():
            yield variant(dn, dn, bd)
        for fmt, name in _cfg.FORMAT_NAMES.items():
            for bd in (64, 128):
                yield variant(dn, name, bd, fmt, True)
    yield variant("fp32", "bf16", 128)
    yield variant("bf16", "bf16", 128, has_scale=True)
