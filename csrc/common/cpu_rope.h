// RoPE on load (CPU): convert one key row to fp32 and rotate it at the position whose table row
// is given, in one pass. Header-only and always inlined, so each ISA copy of a kernel body
// (common/cpu_per_isa.h) vectorises it for its own target. The math, for the pairs (a, b) of
// channels [0, rot_dim):
//   (a, b) -> (a cos_i - b sin_i, b cos_i + a sin_i),  i in [0, rot_dim / 2)
// with the pairs (i, i + rot_dim / 2) (NeoX halves) or (2i, 2i + 1) (GPT-J); channels past
// rot_dim pass through. The spec is kvmem/ops/paged_attention/reference.py's apply_rotary.
#pragma once

#include "common/cpu_dtype.h"
#include "common/cpu_isa.h"

namespace kvmem {
namespace cpu {

// dst[0:n] = the key row src[0:n] (cache dtype) in fp32 times mul (its dequantisation scale,
// 1 without), channels [0, rot_dim) then rotated; cos_sin: [rot_dim] = cos half, then sin half,
// of the key's position.
template <typename T>
KVMEM_INLINE void rope_load_row(const T* KVMEM_RESTRICT src, float* KVMEM_RESTRICT dst,
                                const float* KVMEM_RESTRICT cos_sin, int rot_dim, int n,
                                bool neox, float mul = 1.0f) {
  const int half = rot_dim / 2;
  const float* KVMEM_RESTRICT c = cos_sin;
  const float* KVMEM_RESTRICT s = cos_sin + half;
  if (neox) {
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float a = to_float(src[i]) * mul, b = to_float(src[i + half]) * mul;
      dst[i] = a * c[i] - b * s[i];
      dst[i + half] = b * c[i] + a * s[i];
    }
  } else {
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float a = to_float(src[2 * i]) * mul, b = to_float(src[2 * i + 1]) * mul;
      dst[2 * i] = a * c[i] - b * s[i];
      dst[2 * i + 1] = b * c[i] + a * s[i];
    }
  }
  if (rot_dim < n) load_row_scaled(src + rot_dim, dst + rot_dim, n - rot_dim, mul);
}

}  // namespace cpu
}  // namespace kvmem
