// kvmem_C::merge_states's parameters as the kernels see them (raw pointers, element strides,
// sizes), filled once from the op's tensors (params_from_tensors.h) by the CPU and the CUDA glue. No torch
// or CUDA headers.
#pragma once

#include <stdint.h>

namespace kvmem {

struct MergeStatesParams {
  void* out; float* lse;                          // [T, H, D], [T, H]
  const void* out_a; const float* lse_a;          // [T, H, D], [T, H]
  const void* out_b; const float* lse_b;          // [T, H, D], [T, H]
  int64_t o_stride_t, o_stride_h, a_stride_t, a_stride_h, b_stride_t, b_stride_h;       // elements
  int64_t lse_stride_t, lse_stride_h, la_stride_t, la_stride_h, lb_stride_t, lb_stride_h;  // elements
  int num_tokens, num_heads, head_dim;
};

}  // namespace kvmem
