// kvmem_C::cache_write's parameters as the kernels see them (raw pointers, element strides,
// sizes), filled once from the op's tensors (params_from_tensors.h) by the CPU and the CUDA glue. No torch
// or CUDA headers.
#pragma once

#include <stdint.h>

namespace kvmem {

struct CacheWriteParams {
  const void* k;                // [T, Hkv, D]
  const void* v;                // [T, Hkv, D]
  void* k_cache;                // [num_blocks, block_size, Hkv, D]
  void* v_cache;                // [num_blocks, block_size, Hkv, D]
  const int64_t* slot_mapping;  // [T]: block * block_size + offset, < 0 skips the token
  const float* k_scale;         // [Hkv] or 0-d fp32 (stride 0), or nullptr: k / scale is stored
  const float* v_scale;         // [Hkv] or 0-d fp32 (stride 0), or nullptr
  int64_t k_scale_stride, v_scale_stride;                   // elements (0 for a 0-d scale)
  int64_t k_stride_t, k_stride_h, v_stride_t, v_stride_h;  // elements
  int64_t kc_stride_b, kc_stride_s, kc_stride_h;           // elements
  int64_t vc_stride_b, vc_stride_s, vc_stride_h;           // elements
  int64_t slot_stride;                                      // elements
  int num_tokens, num_kv_heads, head_dim, block_size;
};

}  // namespace kvmem
