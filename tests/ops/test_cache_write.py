"""cache_write vs the specification, by backend: the C++ CPU op through the public entry point
(``cpu``), the Triton kernel under the interpreter (``triton``), and on a GPU the CUDA and
compiled Triton ops (marked ``gpu``; that test checks merge_states on the GPU too). Every write
must match the reference bit for bit: it is a copy (with a cast to the cache dtype).
"""

import importlib
import math

import pytest
import torch

import kvmem
from backends import PASSED, on
from kvmem.ops import reference
from tolerances import assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, BF16, F16]
GPU_DTYPES = {"float32": F32, "bfloat16": BF16, "float16": F16}
GPU_HEAD_DIMS = [64, 80, 96, 112, 128, 256]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@on("cpu")
def test_cache_write(backend, block_size, dtype):
    """Strided k/v (slices of a packed projection), shuffled slots, padding tokens (slot -1)."""
    g = torch.Generator().manual_seed(block_size)
    hkv, d, t = 3, 80, 40
    num_blocks = -(-2 * t // block_size)  # room for every token, half the slots stay NaN
    k_cache = torch.full((num_blocks, block_size, hkv, d), math.nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    packed = torch.randn(t, 2 * hkv + 4, d, generator=g).to(dtype)  # k, v as strided slices
    k, v = packed[:, :hkv], packed[:, hkv:2 * hkv]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[::5] = -1  # padding tokens
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.cache_write(k, v, ref_k, ref_v, slots)
    kvmem.cache_write(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, ref_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, ref_v, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,src_dtype,bs,D,Hkv,layout", [
    (F16, F16, 16, 128, 2, "plain"),
    (BF16, F32, 1, 80, 3, "qkv"),
    (F32, F32, 256, 256, 1, "plain"),
    (F16, F32, 8, 96, 5, "interleaved"),
    (BF16, BF16, 32, 64, 8, "qkv"),
])
@on("triton")
def test_cache_write_kernel(backend, dtype, src_dtype, bs, D, Hkv, layout):
    """The Triton kernel itself: casts, k/v sliced from qkv, interleaved caches, int64 and int32 slots."""
    cw = importlib.import_module("kvmem.ops.cache_write.triton")  # kvmem.ops.cache_write is the function
    gen = torch.Generator().manual_seed(bs)
    T = 11
    num_blocks = max(6, -(-2 * T // bs))
    if layout == "qkv":
        qkv = torch.randn(T, 2 + 2 * Hkv, D, generator=gen).to(src_dtype)
        k, v = qkv[:, 2: 2 + Hkv], qkv[:, 2 + Hkv:]
    else:
        k = torch.randn(T, Hkv, D, generator=gen).to(src_dtype)
        v = torch.randn(T, Hkv, D, generator=gen).to(src_dtype)
    if layout == "interleaved":
        buf = torch.randn(num_blocks, 2, bs, Hkv, D, generator=gen).to(dtype)
        kc, vc = buf[:, 0], buf[:, 1]
    else:
        kc = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
        vc = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T].long()
    slots[[2, 7]] = -1
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.cache_write(k, v, kc_ref, vc_ref, slots)

    def same(a, b):  # fp32 -> bf16 too: the kernel rounds to nearest even with integer operations
        assert torch.equal(a, b)

    cw.cache_write(k, v, kc, vc, slots)
    same(kc, kc_ref)
    same(vc, vc_ref)
    kc2, vc2 = kc_ref.clone(), vc_ref.clone()  # int32 slot mapping too
    cw.cache_write(k, v, kc2, vc2, slots.int())
    same(kc2, kc_ref)
    same(vc2, vc_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
@on("cuda", "triton")
def test_cache_write_and_merge_gpu(backend, dtype_name, head_dim):
    """cache_write over page sizes 1..256 (k/v strided slices on the device), then merge_states
    with empty partials; each passing (backend, dtype, head dim) is recorded for both ops."""
    dtype = GPU_DTYPES[dtype_name]
    g = torch.Generator().manual_seed(head_dim)
    for block_size in (1, 16, 64, 128, 256):
        k_cache = torch.full((7, block_size, 3, head_dim), math.nan, dtype=dtype)
        v_cache = torch.full_like(k_cache, math.nan)
        packed = torch.randn(20, 8, head_dim, generator=g).to(dtype)
        k, v = packed[:, :3], packed[:, 3:6]
        slots = torch.randperm(7 * block_size, generator=g)[:20] if 7 * block_size >= 20 else \
            torch.cat([torch.randperm(7 * block_size, generator=g), torch.full((20 - 7 * block_size,), -1)])
        slots[::4] = -1
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        reference.cache_write(k, v, ref_k, ref_v, slots)
        kc, vc = k_cache.cuda(), v_cache.cuda()
        packed_d = packed.cuda()  # k, v stay strided slices of the packed projection on the GPU
        kvmem.cache_write(packed_d[:, :3], packed_d[:, 3:6], kc, vc, slots.cuda())
        torch.testing.assert_close(kc.cpu(), ref_k, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(vc.cpu(), ref_v, equal_nan=True, atol=0, rtol=0)
    out_a, out_b = (torch.randn(33, 5, head_dim, generator=g).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(33, 5, generator=g) * 3 for _ in range(2))
    lse_a[0], lse_b[1] = -math.inf, -math.inf
    out_a[0], out_b[1] = math.nan, math.nan
    lse_a[2], lse_b[2] = -math.inf, -math.inf
    out, lse = kvmem.merge_states(out_a.cuda(), lse_a.cuda(), out_b.cuda(), lse_b.cuda())
    ref, ref_lse = reference.merge_states(out_a, lse_a, out_b, lse_b)
    assert_close(out.cpu(), ref)
    assert_close(lse.cpu(), ref_lse, what="lse")
    for op in ("cache_write", "merge_states"):
        PASSED.setdefault(backend, []).append({"op": op, "dtype": dtype_name, "head_dim": head_dim, "block_size": 0})
