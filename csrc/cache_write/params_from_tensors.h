// Fill CacheWriteParams from kvmem_C::cache_write's arguments (ATen; shared by the CPU and the CUDA glue).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cache_write/params.h"

namespace kvmem {

// The caller has checked shapes, dtypes and devices.
inline CacheWriteParams cache_write_params(const at::Tensor& k, const at::Tensor& v,
                                           at::Tensor& k_cache, at::Tensor& v_cache,
                                           const at::Tensor& slot_mapping,
                                           const std::optional<at::Tensor>& k_scale,  // 0-d or [Hkv] fp32
                                           const std::optional<at::Tensor>& v_scale) {
  CacheWriteParams p{};
  p.k = k.data_ptr(), p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>(), p.slot_stride = slot_mapping.stride(0);
  p.k_stride_t = k.stride(0), p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0), p.v_stride_h = v.stride(1);
  p.kc_stride_b = k_cache.stride(0), p.kc_stride_s = k_cache.stride(1), p.kc_stride_h = k_cache.stride(2);
  p.vc_stride_b = v_cache.stride(0), p.vc_stride_s = v_cache.stride(1), p.vc_stride_h = v_cache.stride(2);
  if (k_scale.has_value()) {
    p.k_scale = k_scale->data_ptr<float>(), p.k_scale_stride = k_scale->dim() == 1 ? k_scale->stride(0) : 0;
  }
  if (v_scale.has_value()) {
    p.v_scale = v_scale->data_ptr<float>(), p.v_scale_stride = v_scale->dim() == 1 ? v_scale->stride(0) : 0;
  }
  p.num_tokens = static_cast<int>(k.size(0));
  p.num_kv_heads = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(k.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  return p;
}

}  // namespace kvmem
