// kvmem_C::memory_select's parameters as the kernels see them (raw pointers, element strides,
// sizes), filled once from the op's tensors (params_from_tensors.h). No torch headers.
#pragma once

#include <stdint.h>

namespace kvmem {

// How the summaries were made (kvmem/ops/memory_select/reference.py): [min, max], [centre, radius]
// two representative keys, or the mean key (read once).
enum class SummaryKind : int { kMinMax = 0, kBox = 1, kReps = 2, kMean = 3 };

struct MemorySelectParams {
  int32_t* selected;                   // [B, Hkv, top_k]
  const void* q;                       // [T, Hq, D]
  const void* summaries;               // [num_blocks, Hkv, 2, D]
  const int32_t* bank_table;           // [B, max_bank]
  const int32_t* bank_lens;            // [B]
  const int32_t* cu_seqlens_q;         // [B + 1]
  const int32_t* query_index;          // [B] or null (each segment's first token)
  int64_t sel_stride_b, sel_stride_h;  // elements (the last dim has unit stride)
  int64_t q_stride_t, q_stride_h;
  int64_t s_stride_n, s_stride_h, s_stride_2;
  int64_t bt_stride_b, bt_stride_j;
  int64_t num_tokens, num_blocks, max_bank;
  int batch, num_heads, num_kv_heads, head_dim, top_k;
  float scale;
  SummaryKind summary;
};

}  // namespace kvmem
