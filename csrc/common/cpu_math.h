// Scalar math for the softmax inner loops of kvmem's CPU kernels: an inlinable, vectorisable exp
// and tanh (no libm call), and -inf. The same functions on whole vectors are in cpu_vec.inc.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/cpu_dtype.h"

namespace kvmem {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// exp for the softmax inner loops: inlinable and auto-vectorisable (no libm call), |rel err| about
// 1 ulp. exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 in [-ln2/2, ln2/2] (ln2 split in
// a short high part and a correction so that n*ln2_hi is exact), exp(r) by its degree-7 Taylor
// polynomial (truncation error < 1e-8 on that interval). Results below 2^-126 flush to 0, so
// exp(-inf) == 0 (masked / empty states rely on this); x is clamped at 88 (no overflow to inf).
// ---------------------------------------------------------------------------------------------
KVMEM_INLINE float exp_fast(float x) {
  const float xc = x < 88.0f ? x : 88.0f;  // (a < b ? a : b is exactly minps: NaN passes through)
  const float t = xc * 1.44269504088896341f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer
  const float nf = (t + magic) - magic;
  const int32_t n = static_cast<int32_t>(float_to_bits(t + magic) - float_to_bits(magic));
  float r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  const float res = p * two_n;
  // Flush below 2^-126 (and -inf) to 0 with an integer mask: a select here could become a branch
  // and stop the loop from vectorising.
  const uint32_t keep = 0u - static_cast<uint32_t>(!(xc < -87.0f));
  return bits_to_float(float_to_bits(res) & keep);
}

// tanh(y) = sign(y) * (1 - e) / (1 + e), e = exp(-2|y|) (absolute error ~1e-7).
KVMEM_INLINE float tanh_fast(float y) {
  const float e = exp_fast(-2.0f * std::fabs(y));
  const float t = (1.0f - e) / (1.0f + e);
  return std::copysign(t, y);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace cpu
}  // namespace kvmem
