// Exact merge of two partial attentions:
//   lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
// An empty partial (lse = -inf) contributes nothing, even if its out holds NaN.
// grid = (num_tokens, num_heads), block = min(head_dim, 256) threads.
#pragma once

#include <stdint.h>

#include "common/cuda_vec.cuh"
#include "merge_states/params.h"

namespace kvmem {

template <typename T>
__global__ void merge_states_kernel(const MergeStatesParams p) {
  const int t = blockIdx.x, h = blockIdx.y;
  const float la = p.lse_a[t * p.la_stride_t + h * p.la_stride_h];
  const float lb = p.lse_b[t * p.lb_stride_t + h * p.lb_stride_h];
  const float mx = fmaxf(la, lb);
  float wa = 0.f, wb = 0.f, lse = -INFINITY;
  if (mx != -INFINITY) {
    const float ea = expf(la - mx), eb = expf(lb - mx);
    lse = mx + logf(ea + eb);
    wa = ea / (ea + eb);
    wb = eb / (ea + eb);
  }
  const T* a = static_cast<const T*>(p.out_a) + t * p.a_stride_t + h * p.a_stride_h;
  const T* b = static_cast<const T*>(p.out_b) + t * p.b_stride_t + h * p.b_stride_h;
  T* o = static_cast<T*>(p.out) + t * p.o_stride_t + h * p.o_stride_h;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    const float x = wa > 0.f ? wa * to_float<T>(a[d]) : 0.f;
    const float y = wb > 0.f ? wb * to_float<T>(b[d]) : 0.f;
    o[d] = from_float<T>(x + y);
  }
  if (threadIdx.x == 0) p.lse[t * p.lse_stride_t + h * p.lse_stride_h] = lse;
}

}  // namespace kvmem
