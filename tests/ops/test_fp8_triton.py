"""Quantised and cross-dtype caches on the Triton backend (under the interpreter on CPU tensors):
``cache_write`` bit for bit against the reference (float8 codes compared as uint8), and
``paged_attention`` (decode, prefill, mixed batches) against the reference given the SAME cache
contents, so that only fp32 arithmetic order differs (tolerances: tests/tolerances.py).

A pairwise subset over: float8 format (e4m3fn, e5m2), 0-d / per-KV-head scales, GQA group, head
dim, page size, shuffled block tables and unused slots holding float8 NaN codes (0x7F), decode /
prefill / mixed batches / split decode, RoPE on load (NeoX, GPT-J, partial), window / softcap /
sink, float caches with scales and float caches of another dtype than q.
"""

from __future__ import annotations

import importlib
import math
import zlib

import pytest
import torch

import backends  # noqa: F401  (first: TRITON_INTERPRET=1 where there is no GPU, before triton is imported)
from kvmem.dispatch import Call, capability
from kvmem.ops import reference as ref
from tolerances import TRITON_LSE, TRITON_OUT
from triton_problems import args_of, build, cfgs, pa, poisoned_outputs

cw = importlib.import_module("kvmem.ops.cache_write.triton")  # kvmem.ops.cache_write is the function

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(autouse=True)
def _interpreter_only():
    if not cfgs.interpreting():
        pytest.skip("Triton interpreter test (CPU tensors): run with TRITON_INTERPRET=1")


def _scales(kind, hkv, gen, spread=1.0):
    """(k_scale, v_scale): None, 0-d or [hkv] fp32."""
    if kind is None:
        return None, None
    if kind == "0d":
        return torch.tensor(0.37 * spread), torch.tensor(1.9 * spread)
    return ((torch.rand(hkv, generator=gen) + 0.2) * spread, (torch.rand(hkv, generator=gen) + 0.5) * spread)


# ---------------------------------------------------------------------------------------------
# cache_write: bit-exact against the reference
# ---------------------------------------------------------------------------------------------

# (cache dtype, k/v dtype, scales, head dim, page size, KV heads, k/v layout)
WRITE_CASES = [
    (E4M3, F32, "0d", 128, 16, 2, "plain"),
    (E4M3, BF16, "head", 64, 1, 3, "qkv"),
    (E4M3, F16, "head", 80, 8, 1, "plain"),
    (E5M2, F32, "head", 96, 32, 4, "qkv"),
    (E5M2, BF16, "0d", 256, 8, 2, "plain"),
    (E5M2, F16, "0d", 64, 16, 3, "qkv"),
    (BF16, F32, "head", 128, 16, 2, "plain"),  # float caches with scales: clamp to the format's max
    (F16, F32, "0d", 64, 8, 3, "qkv"),
    (F32, BF16, "head", 80, 1, 2, "plain"),
    (BF16, F32, None, 128, 8, 2, "qkv"),  # another float dtype, no scales: round to nearest even
    (BF16, F16, None, 64, 16, 1, "plain"),
    (F16, BF16, None, 96, 8, 2, "plain"),
    (F16, F32, None, 256, 32, 1, "qkv"),
]


def _write_inputs(src, T, hkv, D, layout, gen, spread):
    """k, v [T, hkv, D] of ``src`` (strided slices of a qkv buffer for "qkv"), of magnitudes over
    many binades, with out-of-range values, +-inf, NaN, +-0 and float8 midpoints in them."""
    if layout == "qkv":
        buf = torch.randn(T, 2 + 2 * hkv, D, generator=gen)
        k, v = buf[:, 2:2 + hkv], buf[:, 2 + hkv:]
    else:
        k, v = torch.randn(T, hkv, D, generator=gen), torch.randn(T, hkv, D, generator=gen)
    for x in (k, v):
        x.mul_(torch.exp2(torch.randint(-20, 12, x.shape, generator=gen).float()) * spread)
        x[0, 0, :8] = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0, 1e30, -1e30, 1e-40])
        x[1, 0, :6] = torch.tensor([17.0, 18.0, 19.0, -0.4375, 0.001953125 * 1.5, 464.0]) * spread
    return k.to(src), v.to(src)


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_cache_write_bit_exact(case):
    dtype, src, scales, D, bs, hkv, layout = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) % 1000)
    T = 9
    num_blocks = max(4, -(-2 * T // bs))
    k_scale, v_scale = _scales(scales if scales is None else ("0d" if scales == "0d" else "head"), hkv, gen)
    k, v = _write_inputs(src, T, hkv, D, layout, gen, 1.0 if scales is None else float(k_scale.mean()))
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    slots[[3, 6]] = -1
    kc = torch.full((num_blocks, bs, hkv, D), math.nan).to(dtype)
    vc = kc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref.cache_write(k, v, kc_ref, vc_ref, slots, k_scale, v_scale)
    cw.cache_write(k, v, kc, vc, slots, k_scale, v_scale)
    if dtype in (E4M3, E5M2):
        assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
        assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))
    else:  # NaN compare equal (their payload bits are torch's business)
        torch.testing.assert_close(kc, kc_ref, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(vc, vc_ref, equal_nan=True, atol=0, rtol=0)
