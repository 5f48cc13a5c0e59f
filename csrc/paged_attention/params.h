// kvmem_C::paged_attention's parameters as the kernels see them: raw pointers, element strides,
// sizes and the semantics, filled once from the op's tensors (params_from_tensors.h) and passed
// to the CPU kernel (cpu.cpp) and the CUDA kernels (csrc/kernels/paged_decode.cuh), each of which
// extends it with its own scheduling state. No torch or CUDA headers.
#pragma once

#include <stdint.h>

namespace kvmem {

struct PagedAttentionParams {
  const void* q;                // [T, Hq, D]
  const void* k_cache;          // [num_blocks, block_size, Hkv, D]
  const void* v_cache;          // [num_blocks, block_size, Hkv, D]
  const int32_t* block_table;   // [B, max_blocks]
  const int32_t* seq_lens;      // [B]
  const int32_t* cu_seqlens_q;  // [B + 1]
  const float* sink_logits;     // [Hq] or nullptr
  const float* k_scale;         // [Hkv] or 0-d fp32 (stride 0), or nullptr: key = stored * scale
  const float* v_scale;         // [Hkv] or 0-d fp32 (stride 0), or nullptr
  const float* rope_cos_sin;    // [num_positions, rot_dim] fp32 (cos half, sin half) or nullptr
  void* out;                    // [T, Hq, D] (q's dtype)
  float* lse;                   // [T, Hq] or nullptr
  int64_t q_stride_t, q_stride_h;              // elements
  int64_t k_stride_b, k_stride_s, k_stride_h;  // elements
  int64_t v_stride_b, v_stride_s, v_stride_h;  // elements
  int64_t o_stride_t, o_stride_h;              // elements
  int64_t lse_stride_t, lse_stride_h;          // elements (0 without lse)
  int64_t table_stride_b, table_stride_m;      // elements
  int64_t seq_lens_stride, cu_seqlens_stride, sink_stride;  // elements
  int64_t rope_stride;                         // elements between positions of rope_cos_sin
  int64_t k_scale_stride, v_scale_stride;      // elements (0 for a 0-d scale)
  int64_t max_seqlen_q, max_seqlen_k;  // host upper bounds over the sequences
  int num_tokens, num_seqs, num_heads, num_kv_heads, group, head_dim, block_size;
  float scale;
  float softcap;  // 0: none (the schema's "softcap <= 0: none", converted here only)
  int window;     // 0: none (the schema's "window <= 0: none"), else clamped to 2^31 - 1
  int rot_dim;     // RoPE on load: channels [0, rot_dim) of each key rotated (0: no rope)
  bool causal;
  bool rope_neox;  // rotate halves (i, i + rot_dim / 2), else interleaved pairs (2i, 2i + 1)
};

}  // namespace kvmem
