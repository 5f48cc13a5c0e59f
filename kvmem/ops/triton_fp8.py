"""Cache-element conversions shared by every op's Triton kernels: float8 codes (e4m3fn, e5m2) as
integer bit operations on their uint8 storage, and round-to-nearest-even fp32 -> bf16.

The caches travel to the kernels viewed as ``torch.uint8`` and are never handled as Triton's
float8 types (missing before sm_89, and wrong in some versions' interpreter). The encoding is
kvmem's one cache encoding (``kvmem.ops._common.encode``): in fp32, clamped to +- the format's
largest finite value, rounded to nearest even; NaN stays NaN (``sign | 0x7F``), -0.0 stays -0.0.
tests/ops/test_fp8_encoding.py checks every function here bit for bit against torch.

``FORMAT`` (constexpr) names the cache element: :data:`FLOAT` (a float cache, no conversion),
:data:`E4M3` or :data:`E5M2` (host side: ``kvmem.ops._triton.cache_format``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvmem.ops._triton import E4M3, E5M2, FLOAT  # noqa: F401  (the FORMAT values)

__all__ = ["fp8_decode", "fp8_decode_f16", "fp8_encode", "bf16_rne", "to_f32", "encode_for_cache", "F16_UNIT"]

# What fp8_decode_f16 multiplies each format's values by (a kernel folds the inverse into its scale).
F16_UNIT = {FLOAT: 1.0, E4M3: 2.0 ** -8, E5M2: 1.0}


@triton.jit
def fp8_decode_f16(bits, FORMAT: tl.constexpr):
    """fp16 tensor of the float8 codes ``bits`` (uint8) times ``F16_UNIT[FORMAT]``, exactly.

    e5m2 is the high byte of an fp16 (``bits << 8``; inf and NaN included). e4m3fn's 4-bit
    exponent (bias 7) and 3-bit mantissa sit in an fp16's low exponent bits: ``(b & 0x7F) << 7``
    with the sign at bit 15 is the code's value times 2^-8 (bias 15 = 7 + 8), subnormal codes
    included (fp16 subnormals, exact); code 0x7F (and 0xFF) is NaN. Every result is exact in
    fp16, bf16 and fp32, so a dot product can take it in the query's dtype unrounded.
    """
    b = bits.to(tl.uint16)  # 16-bit integer operations: fewer registers than 32-bit ones (sm80)
    if FORMAT == 1:
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        h = tl.where((b & 0x7F) == 0x7F, h | 0x7E00, h)  # NaN (sign kept)
    else:
        h = b << 8
    return h.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def fp8_decode(bits, FORMAT: tl.constexpr):
    """fp32 values of the float8 codes ``bits`` (uint8), exactly."""
    x = fp8_decode_f16(bits, FORMAT).to(tl.float32)
    if FORMAT == 1:
        x = x * 256.0
    return x


@triton.jit
def fp8_encode(x, FORMAT: tl.constexpr):
    """The float8 codes (uint8) of fp32 ``x``: clamp to +- max finite, round to nearest even.

    Normal range: the fp32 bits rounded to 3 (e4m3) / 2 (e5m2) mantissa bits with ties to even,
    ``(a + half - 1 + lsb) >> shift`` (a carry moves into the exponent, as it must), then the
    exponent rebiased by 127 - 7 (e4m3) / 127 - 15 (e5m2). Subnormal range (below 2^-6 / 2^-14):
    the code is the number of subnormal steps, ``a * 2^9`` (``2^16``) rounded to an integer by
    adding 2^23 in fp32 (exact products; the addition rounds to nearest even).
    """
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    nan = a > 0x7F800000
    if FORMAT == 1:
        a = tl.minimum(a, 0x43E00000)  # 448.0 (+inf and everything above clamp to it)
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        sub = (a.to(tl.float32, bitcast=True) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
        code = tl.where(a >= 0x3C800000, normal, sub)  # 2^-6, the smallest normal
    else:
        a = tl.minimum(a, 0x47600000)  # 57344.0
        normal = ((a + 0xFFFFF + ((a >> 21) & 1)) >> 21) - (112 << 2)
        sub = (a.to(tl.float32, bitcast=True) * 65536.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
        code = tl.where(a >= 0x38800000, normal, sub)  # 2^-14
    code = tl.where(nan, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def bf16_rne(x):
    """``x`` (fp32) rounded to nearest even into bf16, as torch (and the GPU's ``cvt.rn``) do;
    Triton's interpreter truncates. NaN becomes the quiet NaN 0x7FC0 (sign kept)."""
    u = x.to(tl.int32, bitcast=True)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(nan, (u >> 16) | 0x40, r)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_f32(x):
    """``x`` in fp32, exactly: bf16 by its bits (Triton's interpreter flushes bf16 subnormals to
    zero when converting), other dtypes by a cast."""
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def encode_for_cache(x, scale, cache_ptr, FORMAT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``x`` as stored in the cache ``cache_ptr`` points into (kvmem's one cache encoding, the
    reference ``cache_write``): with a scale, ``x / scale`` in fp32 (IEEE division), clamped to +-
    the cache format's largest finite value (NaN kept); then rounded to nearest even into the
    cache's element (float8 codes for ``FORMAT`` e4m3/e5m2, whose cache is uint8)."""
    if HAS_SCALE:
        x = tl.math.div_rn(to_f32(x), scale)
        if FORMAT == 0:
            if cache_ptr.dtype.element_ty == tl.float16:
                big: tl.constexpr = 65504.0
            elif cache_ptr.dtype.element_ty == tl.bfloat16:
                big: tl.constexpr = 3.3895313892515355e38
            else:
                big: tl.constexpr = 3.4028234663852886e38
            x = tl.where(x > big, big, tl.where(x < -big, -big, x))  # comparisons keep NaN
    if FORMAT != 0:
        y = fp8_encode(to_f32(x), FORMAT)
    elif cache_ptr.dtype.element_ty == tl.bfloat16 and x.dtype != tl.bfloat16:
        y = bf16_rne(to_f32(x))
    elif cache_ptr.dtype.element_ty == x.dtype:
        y = x
    else:
        y = to_f32(x).to(cache_ptr.dtype.element_ty)
    return y
