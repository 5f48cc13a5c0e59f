// Fill MergeStatesParams from kvmem_C::merge_states's arguments (ATen; shared by the CPU and the CUDA glue).
#pragma once

#include <ATen/ATen.h>

#include "merge_states/params.h"

namespace kvmem {

// The caller has checked shapes, dtypes and devices.
inline MergeStatesParams merge_states_params(at::Tensor& out, at::Tensor& lse,
                                             const at::Tensor& out_a, const at::Tensor& lse_a,
                                             const at::Tensor& out_b, const at::Tensor& lse_b) {
  MergeStatesParams p{};
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  p.out_a = out_a.data_ptr(), p.lse_a = lse_a.data_ptr<float>();
  p.out_b = out_b.data_ptr(), p.lse_b = lse_b.data_ptr<float>();
  p.o_stride_t = out.stride(0), p.o_stride_h = out.stride(1);
  p.a_stride_t = out_a.stride(0), p.a_stride_h = out_a.stride(1);
  p.b_stride_t = out_b.stride(0), p.b_stride_h = out_b.stride(1);
  p.lse_stride_t = lse.stride(0), p.lse_stride_h = lse.stride(1);
  p.la_stride_t = lse_a.stride(0), p.la_stride_h = lse_a.stride(1);
  p.lb_stride_t = lse_b.stride(0), p.lb_stride_h = lse_b.stride(1);
  p.num_tokens = static_cast<int>(out.size(0));
  p.num_heads = static_cast<int>(out.size(1));
  p.head_dim = static_cast<int>(out.size(2));
  return p;
}

}  // namespace kvmem
