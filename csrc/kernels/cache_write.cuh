// Scatter new K/V tokens into their pages: slot = block * block_size + offset, -1 skips.
// grid = num_tokens, block = 128 threads; vector copies over the token's [Hkv, D] rows.
#pragma once

#include <stdint.h>

#include "cache_write/params.h"
#include "common/cuda_kv.cuh"

namespace kvmem {

// The cache in k's dtype, no scales: a copy. VEC elements per copy (16 bytes when head_dim and
// strides allow, else 1).
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

// The cache of another element type C than k's T (a float type, or float8 bits), or with scales:
//   stored = encode_C(k / k_scale[h])   (fp32 IEEE division; no scale: k itself)
// encode_C (common/cuda_kv.cuh kv_store_value): float8 by common/fp8.h (clamp to +-max, round to
// nearest even); a float type rounded to nearest even, clamped to +-max first when scaled.
// VEC source elements per step (16 bytes of k when head_dim and strides allow, else 1), stored as
// VEC * sizeof(C) bytes.
template <typename T, typename C, int VEC>
__global__ void cache_write_convert_kernel(const CacheWriteParams p) {
  constexpr int kStoreAlign = VEC * sizeof(C) < 16 ? VEC * sizeof(C) : 16;
  struct alignas(VEC * sizeof(T)) Src { T x[VEC]; };
  struct alignas(kStoreAlign) Dst { C x[VEC]; };
  const int t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const int64_t blk = slot / p.block_size, off = slot % p.block_size;
  const int vecs = p.head_dim / VEC;
  const bool scaled = p.k_scale != nullptr;  // both or neither (the op validates)
  for (int i = threadIdx.x; i < p.num_kv_heads * vecs; i += blockDim.x) {
    const int h = i / vecs, c = (i % vecs) * VEC;
    const Src ks = *reinterpret_cast<const Src*>(static_cast<const T*>(p.k) + t * p.k_stride_t + h * p.k_stride_h + c);
    const Src vs = *reinterpret_cast<const Src*>(static_cast<const T*>(p.v) + t * p.v_stride_t + h * p.v_stride_h + c);
    Dst kd, vd;
    if (scaled) {
      const float k_div = p.k_scale[h * p.k_scale_stride], v_div = p.v_scale[h * p.v_scale_stride];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        kd.x[e] = kv_store_value<C, true>(to_float<T>(ks.x[e]) / k_div);
        vd.x[e] = kv_store_value<C, true>(to_float<T>(vs.x[e]) / v_div);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        kd.x[e] = kv_store_value<C, false>(to_float<T>(ks.x[e]));
        vd.x[e] = kv_store_value<C, false>(to_float<T>(vs.x[e]));
      }
    }
    *reinterpret_cast<Dst*>(static_cast<C*>(p.k_cache) + blk * p.kc_stride_b + off * p.kc_stride_s +
                            h * p.kc_stride_h + c) = kd;
    *reinterpret_cast<Dst*>(static_cast<C*>(p.v_cache) + blk * p.vc_stride_b + off * p.vc_stride_s +
                            h * p.vc_stride_h + c) = vd;
  }
}

}  // namespace kvmem
