"""kvmem/ops/triton_fp8.py's conversions, bit for bit against torch: the float8 decode (all 256
codes of each format) and encode (every decoded value, the midpoints between neighbouring codes
and those midpoints +-1 fp32 ulp, subnormals, out-of-range values, +-inf, NaN, -0.0) against
kvmem's one cache encoding ``kvmem.ops._common.encode``; fp32 -> bf16 rounding against
``Tensor.to``. The jit helpers run through tiny Triton kernels (under the interpreter on CPU, or
compiled on a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

import backends  # noqa: F401  (first: TRITON_INTERPRET=1 where there is no GPU, before triton is imported)
import triton
import triton.language as tl

from kvmem.ops import triton_fp8
from kvmem.ops._common import encode
from kvmem.ops._triton import cache_format

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _decode_kernel(bits_ptr, out_ptr, out16_ptr, n, FORMAT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    b = tl.load(bits_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, triton_fp8.fp8_decode(b, FORMAT), mask=ok)
    tl.store(out16_ptr + offs, triton_fp8.fp8_decode_f16(b, FORMAT), mask=ok)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, FORMAT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, triton_fp8.fp8_encode(x, FORMAT), mask=ok)


@triton.jit
def _bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, triton_fp8.bf16_rne(x), mask=ok)


BLOCK = 1024


def _decode(bits: torch.Tensor, dtype):
    out = torch.empty(bits.shape, dtype=torch.float32, device=DEV)
    out16 = torch.empty(bits.shape, dtype=torch.float16, device=DEV)
    n = bits.numel()
    _decode_kernel[(triton.cdiv(n, BLOCK),)](bits.to(DEV), out, out16, n, FORMAT=cache_format(dtype), BLOCK=BLOCK)
    return out.cpu(), out16.cpu()


def _encode(x: torch.Tensor, dtype) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.uint8, device=DEV)
    n = x.numel()
    _encode_kernel[(triton.cdiv(n, BLOCK),)](x.to(DEV), out, n, FORMAT=cache_format(dtype), BLOCK=BLOCK)
    return out.cpu()


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf))


def _next_down(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, -math.inf))


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_decode_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(dtype).float()
    got, got16 = _decode(codes, dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(torch.isnan(got16), nan)
    assert torch.equal(_bits(got[~nan]), _bits(want[~nan])), "decode differs from torch's (finite codes)"
    unit = triton_fp8.F16_UNIT[cache_format(dtype)]
    assert torch.equal(_bits(got16[~nan].float() / unit), _bits(want[~nan])), "fp16 decode differs"
    assert torch.equal(torch.signbit(got), torch.signbit(codes.view(torch.int8).float())), "sign bits (NaN too)"


def _encode_inputs(dtype) -> torch.Tensor:
    """Every finite code's value, the midpoints between neighbouring codes (ties: even), those
    +-1 ulp, subnormal fp32, out-of-range values, +-inf, NaN (both signs), +-0."""
    vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    pos = vals[(vals >= 0) & torch.isfinite(vals)].unique().sort().values  # 0 .. max
    mids = (pos[1:] + pos[:-1]) / 2  # exact in fp32
    big = torch.finfo(dtype).max
    beyond = torch.tensor([big * 1.0001, big * 1.04, big * 1.0625, big * 1.2, big * 2, 1e30, 3.4e38,
                           torch.finfo(torch.float32).max])
    smallest = pos[1]
    tiny = torch.tensor([smallest / 2, smallest / 4, smallest * 0.75, smallest * 1.5, 1e-30, 1e-40, 1.4e-45,
                         torch.finfo(torch.float32).tiny])
    mag = torch.cat([pos, mids, _next_up(mids), _next_down(mids), beyond, _next_down(beyond), tiny, _next_up(tiny),
                     _next_up(pos), _next_down(pos[1:]), torch.tensor([math.inf])])
    special = torch.tensor([math.nan, -math.nan, -0.0, 0.0])
    rand = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-8, 6, 4000)
    return torch.cat([mag, -mag, special, rand]).float()


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_encode_matches_the_pinned_encoding(dtype):
    x = _encode_inputs(dtype)
    want = encode(x, dtype).view(torch.uint8)
    got = _encode(x, dtype)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(float(x[i]), int(got[i]), int(want[i])) for i in bad[:10]]


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_encode_table(dtype):
    """The rules, spelled out: +-inf and out of range -> +-max code, NaN -> sign | 0x7F, -0.0."""
    mx = 0x7E if dtype == torch.float8_e4m3fn else 0x7B
    big = torch.finfo(dtype).max
    table = [(math.inf, mx), (-math.inf, 0x80 | mx), (big * 4, mx), (-big * 4, 0x80 | mx), (math.nan, 0x7F),
             (-math.nan, 0xFF), (-0.0, 0x80), (0.0, 0x00), (big, mx)]
    got = _encode(torch.tensor([v for v, _ in table], dtype=torch.float32), dtype)
    assert got.tolist() == [c for _, c in table]


def test_bf16_round_to_nearest_even():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=gen) * torch.logspace(-30, 30, 5000)
    b = torch.arange(0, 0x7F80, 37, dtype=torch.int32) << 16  # bf16 values, then their midpoints +- 1 ulp
    mids = (b | 0x8000).view(torch.float32)
    x = torch.cat([x, mids, _next_up(mids), _next_down(mids), torch.tensor([3.4e38, -3.4e38, math.inf, -math.inf,
                                                                             -0.0, 1e-45, -1e-42])])
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEV)
    _bf16_kernel[(triton.cdiv(x.numel(), BLOCK),)](x.to(DEV), out, x.numel(), BLOCK=BLOCK)
    assert torch.equal(out.cpu().view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    nan = torch.tensor([math.nan], device=DEV)
    _bf16_kernel[(1,)](nan, out, 1, BLOCK=BLOCK)
    assert torch.isnan(out[:1].cpu()).all()
