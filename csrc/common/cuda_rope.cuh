// RoPE on load (CUDA, device code only): rotate the channels of one key row that a thread holds,
// in fp32, at the key's position. Same math as the CPU's common/cpu_rope.h:
//   (a, b) -> (a cos_i - b sin_i, b cos_i + a sin_i),  i in [0, rot_dim / 2)
// on the pairs (i, i + rot_dim / 2) (NeoX halves) or (2i, 2i + 1) (GPT-J); channels past
// rot_dim pass through. A GPT-J pair lies within one thread's vector (VEC is even); a NeoX
// partner channel lies in another thread's vector and is read again from the row (an L2/L1 hit:
// its line was just loaded).
#pragma once

#include <stdint.h>

#include "common/cuda_kv.cuh"

namespace kvmem {

// kf: [VPT * VEC] fp32, the thread's vectors of the row (vector v = channels (tl + v * TPK) * VEC
// + [0, VEC)), as kv_unpack gives them (times kv_decode_mul<KV>(): rotation is linear, the
// partner channels are read at the same factor); row: the key's row in the cache (elements KV);
// cos_sin: its table row [rot_dim] (cos, then sin).
template <typename KV, int VEC, int VPT, int TPK>
__device__ __forceinline__ void rope_rotate_vecs(float* kf, const KV* __restrict__ row,
                                                 const float* __restrict__ cos_sin, int rot_dim,
                                                 bool neox, int tl) {
  const int half = rot_dim >> 1;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int d0 = (tl + v * TPK) * VEC;
    if (d0 >= rot_dim) continue;
    if (neox) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int d = d0 + e;
        if (d < rot_dim) {
          const bool first = d < half;
          const int i = first ? d : d - half;
          const float c = __ldg(cos_sin + i), s = __ldg(cos_sin + half + i);
          const float other = kv_to_float<KV>(row + (first ? d + half : d - half));
          kf[v * VEC + e] = first ? kf[v * VEC + e] * c - other * s : kf[v * VEC + e] * c + other * s;
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        const int d = d0 + e;
        if (d < rot_dim) {
          const int i = d >> 1;
          const float c = __ldg(cos_sin + i), s = __ldg(cos_sin + half + i);
          const float a = kf[v * VEC + e], b = kf[v * VEC + e + 1];
          kf[v * VEC + e] = a * c - b * s;
          kf[v * VEC + e + 1] = b * c + a * s;
        }
      }
    }
  }
}

}  // namespace kvmem
