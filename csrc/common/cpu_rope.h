// RoPE on load (CPU): rotate one fp32 key row in place at the position whose table row is given.
// Header-only and always inlined, so each ISA copy of a kernel body (common/cpu_per_isa.h)
// vectorises it for its own target. The math, for the pairs (a, b) of channels [0, rot_dim):
//   (a, b) -> (a cos_i - b sin_i, b cos_i + a sin_i),  i in [0, rot_dim / 2)
// with the pairs (i, i + rot_dim / 2) (NeoX halves) or (2i, 2i + 1) (GPT-J); channels past
// rot_dim pass through. The spec is kvmem/ops/paged_attention/reference.py's apply_rotary.
#pragma once

#include "common/cpu_isa.h"

namespace kvmem {
namespace cpu {

// x: [head_dim] fp32 key row (rotated in place); cos_sin: [rot_dim] = cos half, then sin half.
KVMEM_INLINE void rope_rotate_row(float* KVMEM_RESTRICT x, const float* KVMEM_RESTRICT cos_sin,
                                  int rot_dim, bool neox) {
  const int half = rot_dim / 2;
  const float* KVMEM_RESTRICT c = cos_sin;
  const float* KVMEM_RESTRICT s = cos_sin + half;
  if (neox) {
    float* KVMEM_RESTRICT x1 = x;
    float* KVMEM_RESTRICT x2 = x + half;
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float a = x1[i], b = x2[i];
      x1[i] = a * c[i] - b * s[i];
      x2[i] = b * c[i] + a * s[i];
    }
  } else {
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * c[i] - b * s[i];
      x[2 * i + 1] = b * c[i] + a * s[i];
    }
  }
}

}  // namespace cpu
}  // namespace kvmem
