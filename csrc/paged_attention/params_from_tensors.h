// Fill PagedAttentionParams from kvmem_C::paged_attention's arguments (ATen; shared by the CPU and
// the CUDA glue). The one place where the schema's sentinels are converted: window <= 0 and
// softcap <= 0 mean none (0 in the params). The caller has checked shapes, dtypes and devices.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "paged_attention/params.h"

namespace kvmem {

inline PagedAttentionParams paged_attention_params(
    at::Tensor& out,                              // [T, Hq, D]
    const std::optional<at::Tensor>& lse,         // [T, Hq] fp32
    const at::Tensor& q,                          // [T, Hq, D]
    const at::Tensor& k_cache,                    // [num_blocks, block_size, Hkv, D]
    const at::Tensor& v_cache,                    // [num_blocks, block_size, Hkv, D]
    const at::Tensor& block_table,                // [B, max_blocks] int32
    const at::Tensor& seq_lens,                   // [B] int32
    const at::Tensor& cu_seqlens_q,               // [B + 1] int32
    int64_t max_seqlen_q, int64_t max_seqlen_k,   // host upper bounds
    double scale, bool causal, int64_t window, double softcap,
    const std::optional<at::Tensor>& sink_logits,  // [Hq] fp32
    const std::optional<at::Tensor>& k_scale,      // 0-d or [Hkv] fp32
    const std::optional<at::Tensor>& v_scale,      // 0-d or [Hkv] fp32
    const std::optional<at::Tensor>& rope_cos_sin, // [num_positions, rot_dim] fp32
    bool rope_neox
) {
  PagedAttentionParams p{};
  p.q = q.data_ptr();
  p.q_stride_t = q.stride(0), p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.k_stride_b = k_cache.stride(0), p.k_stride_s = k_cache.stride(1), p.k_stride_h = k_cache.stride(2);
  p.v_cache = v_cache.data_ptr();
  p.v_stride_b = v_cache.stride(0), p.v_stride_s = v_cache.stride(1), p.v_stride_h = v_cache.stride(2);
  p.block_table = block_table.data_ptr<int32_t>();
  p.table_stride_b = block_table.stride(0), p.table_stride_m = block_table.stride(1);
  p.seq_lens = seq_lens.data_ptr<int32_t>(), p.seq_lens_stride = seq_lens.stride(0);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>(), p.cu_seqlens_stride = cu_seqlens_q.stride(0);
  if (sink_logits.has_value()) {
    p.sink_logits = sink_logits->data_ptr<float>(), p.sink_stride = sink_logits->stride(0);
  }
  if (k_scale.has_value()) {
    p.k_scale = k_scale->data_ptr<float>(), p.k_scale_stride = k_scale->dim() == 1 ? k_scale->stride(0) : 0;
  }
  if (v_scale.has_value()) {
    p.v_scale = v_scale->data_ptr<float>(), p.v_scale_stride = v_scale->dim() == 1 ? v_scale->stride(0) : 0;
  }
  if (rope_cos_sin.has_value()) {
    p.rope_cos_sin = rope_cos_sin->data_ptr<float>(), p.rope_stride = rope_cos_sin->stride(0);
    p.rot_dim = static_cast<int>(rope_cos_sin->size(1));
  }
  p.rope_neox = rope_neox;
  p.out = out.data_ptr();
  p.o_stride_t = out.stride(0), p.o_stride_h = out.stride(1);
  if (lse.has_value()) {
    p.lse = lse->data_ptr<float>(), p.lse_stride_t = lse->stride(0), p.lse_stride_h = lse->stride(1);
  }
  p.max_seqlen_q = max_seqlen_q, p.max_seqlen_k = max_seqlen_k;
  p.num_tokens = static_cast<int>(q.size(0));
  p.num_seqs = static_cast<int>(seq_lens.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.group = p.num_kv_heads > 0 ? p.num_heads / p.num_kv_heads : 0;
  p.head_dim = static_cast<int>(q.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.scale = static_cast<float>(scale);
  p.softcap = softcap > 0 ? static_cast<float>(softcap) : 0.f;
  p.window = window > 0 ? static_cast<int>(std::min<int64_t>(window, std::numeric_limits<int32_t>::max())) : 0;
  p.causal = causal;
  return p;
}

}  // namespace kvmem
