// Fill MemorySelectParams from kvmem_C::memory_select's arguments (ATen).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "memory_select/params.h"

namespace kvmem {

// The caller has checked shapes, dtypes and devices.
inline MemorySelectParams memory_select_params(at::Tensor& selected, const at::Tensor& q,
                                               const at::Tensor& summaries,
                                               const at::Tensor& bank_table,
                                               const at::Tensor& bank_lens,
                                               const at::Tensor& cu_seqlens_q, double scale,
                                               const std::optional<at::Tensor>& query_index,
                                               SummaryKind summary) {
  MemorySelectParams p{};
  p.selected = selected.data_ptr<int32_t>();
  p.q = q.data_ptr();
  p.summaries = summaries.data_ptr();
  p.bank_table = bank_table.data_ptr<int32_t>();
  p.bank_lens = bank_lens.data_ptr<int32_t>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.query_index = query_index.has_value() ? query_index->data_ptr<int32_t>() : nullptr;
  p.sel_stride_b = selected.stride(0), p.sel_stride_h = selected.stride(1);
  p.q_stride_t = q.stride(0), p.q_stride_h = q.stride(1);
  p.s_stride_n = summaries.stride(0), p.s_stride_h = summaries.stride(1);
  p.s_stride_2 = summaries.stride(2);
  p.bt_stride_b = bank_table.stride(0), p.bt_stride_j = bank_table.stride(1);
  p.num_tokens = q.size(0), p.num_blocks = summaries.size(0), p.max_bank = bank_table.size(1);
  p.batch = static_cast<int>(bank_table.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(summaries.size(1));
  p.head_dim = static_cast<int>(q.size(2));
  p.top_k = static_cast<int>(selected.size(2));
  p.scale = static_cast<float>(scale);
  p.summary = summary;
  return p;
}

}  // namespace kvmem
