// Scatter new K/V tokens into their pages: slot = block * block_size + offset, -1 skips.
// grid = num_tokens, block = 128 threads; 16-byte copies over the token's [Hkv, D] rows.
#pragma once

#include <stdint.h>

#include "cache_write/params.h"

namespace kvmem {

// VEC elements per copy (16 bytes when head_dim and strides allow, else 1).
template <typename T, int VEC>
__global__ void cache_write_kernel(const CacheWriteParams p) {
  struct alignas(VEC * sizeof(T)) Pack { T x[VEC]; };
  const int t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const int64_t blk = slot / p.block_size, off = slot % p.block_size;
  const int vecs = p.head_dim / VEC;
  for (int i = threadIdx.x; i < p.num_kv_heads * vecs; i += blockDim.x) {
    const int h = i / vecs, c = (i % vecs) * VEC;
    const T* ks = static_cast<const T*>(p.k) + t * p.k_stride_t + h * p.k_stride_h + c;
    const T* vs = static_cast<const T*>(p.v) + t * p.v_stride_t + h * p.v_stride_h + c;
    T* kd = static_cast<T*>(p.k_cache) + blk * p.kc_stride_b + off * p.kc_stride_s + h * p.kc_stride_h + c;
    T* vd = static_cast<T*>(p.v_cache) + blk * p.vc_stride_b + off * p.vc_stride_s + h * p.vc_stride_h + c;
    *reinterpret_cast<Pack*>(kd) = *reinterpret_cast<const Pack*>(ks);
    *reinterpret_cast<Pack*>(vd) = *reinterpret_cast<const Pack*>(vs);
  }
}

}  // namespace kvmem
