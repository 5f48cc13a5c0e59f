// The launch of the split-K decode kernel (csrc/kernels/paged_decode.cuh) for one (q dtype T,
// cache element type KV) pair: split count, partial buffers, G_MAX and head-dim dispatch.
// launch_decode<T, KV> is instantiated once per pair in its own translation unit (cuda.cu for
// KV = T, cuda_fp8_e4m3.cu, cuda_fp8_e5m2.cu, cuda_mixed.cu, cuda_scaled.cu), so a parallel build
// compiles the pairs side by side; cuda.cu's glue calls them through the extern declarations below.
#pragma once

#include "common/cuda_glue.h"
#include "common/cuda_kv.cuh"
#include "kernels/paged_decode.cuh"
#include "paged_attention/capabilities.h"

#include <algorithm>
#include <string>

namespace kvmem {
namespace cuda {
namespace decode {


constexpr int kNumWarps = 4;
constexpr int kMinKeysPerSplit = 128;
constexpr int kMaxSplits = 128;

template <typename T, typename KV, int D, int G_MAX, bool ROPE>
void launch(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t stream) {
  auto kernel = paged_decode_kernel<T, KV, D, G_MAX, kNumWarps, ROPE>;
  const int threads = kNumWarps * 32;
  const int units = q.size(0) * p.num_kv_heads * p.head_chunks;
  // Split count by occupancy: enough CTAs to fill every SM, never splits of < kMinKeysPerSplit keys.
  // The occupancy query is cached per device (one cache per kernel instantiation).
  static std::atomic<int> per_sm_cache[kMaxDevices];
  const int per_sm = cached_per_device(per_sm_cache, [&] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
    return n;
  });
  const int sms = sm_count();
  const int target = std::max(1, per_sm) * sms;
  int splits = (target + units - 1) / std::max(units, 1);
  const int by_len = static_cast<int>((max_seqlen_k + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  splits = std::max(1, std::min({splits, by_len, kMaxSplits}));
  p.num_splits = splits;
  at::Tensor partial_out, partial_lse;
  if (splits > 1) {
    partial_out = at::empty({q.size(0), p.num_heads, splits, D}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({q.size(0), p.num_heads, splits}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  TORCH_CHECK(p.num_kv_heads * p.head_chunks <= 65535, "kvmem_C::paged_attention (CUDA): too many KV heads");
  dim3 grid(q.size(0), p.num_kv_heads * p.head_chunks, splits);  // tokens on x (up to 2^31 - 1)
  kernel<<<grid, threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    paged_decode_reduce_kernel<T, D><<<dim3(q.size(0), p.num_heads), D, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// "64, 80, ..." (error messages).
inline std::string head_dim_list() {
  std::string s;
  for (int d : kPagedAttentionCudaHeadDims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}

template <typename T, typename KV, int D, bool ROPE>
void launch_group(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t s) {
  // G_MAX query heads per CTA: the smallest of {1, 2, 4, 8} holding the group (larger groups
  // are cut into chunks of 8).
  const int g = p.group;
  if (g <= 1) { p.head_chunks = 1; launch<T, KV, D, 1, ROPE>(p, max_seqlen_k, q, s); }
  else if (g <= 2) { p.head_chunks = 1; launch<T, KV, D, 2, ROPE>(p, max_seqlen_k, q, s); }
  else if (g <= 4) { p.head_chunks = 1; launch<T, KV, D, 4, ROPE>(p, max_seqlen_k, q, s); }
  else { p.head_chunks = (g + 7) / 8; launch<T, KV, D, 8, ROPE>(p, max_seqlen_k, q, s); }
}

template <typename T, typename KV, int D>
void launch_rope_or_not(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t s) {
  if (p.rot_dim > 0) launch_group<T, KV, D, true>(p, max_seqlen_k, q, s);
  else launch_group<T, KV, D, false>(p, max_seqlen_k, q, s);
}

}  // namespace decode

// The decode kernels for q of T and caches of KV (p filled, q.size(0) > 0, head dim checked
// against kPagedAttentionCudaHeadDims here).
template <typename T, typename KV>
void launch_decode(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t stream,
                   const char* name) {
  const int64_t D = q.size(2);
  switch (D) {
#define KVMEM_HEAD_DIM_CASE(d) \
  case d: decode::launch_rope_or_not<T, KV, d>(p, max_seqlen_k, q, stream); break;
    KVMEM_PAGED_ATTENTION_CUDA_HEAD_DIMS(KVMEM_HEAD_DIM_CASE)
#undef KVMEM_HEAD_DIM_CASE
    default: TORCH_CHECK(false, name, ": head_dim must be one of ", decode::head_dim_list(), "; got ", D);
  }
}

// X(T, KV) for every pair but KV = T (those are instantiated where they are called, in cuda.cu).
#define KVMEM_PAGED_DECODE_OTHER_PAIRS(X)                                                      \
  X(__half, fp8_e4m3) X(__nv_bfloat16, fp8_e4m3) X(__half, fp8_e5m2) X(__nv_bfloat16, fp8_e5m2) \
  X(__half, __nv_bfloat16) X(__nv_bfloat16, __half)                                            \
  X(__half, scaled<__half>) X(__nv_bfloat16, scaled<__nv_bfloat16>)

#define KVMEM_PAGED_DECODE_EXTERN(T, KV)                                                              \
  extern template void launch_decode<T, KV>(PagedDecodeParams&, int64_t, const at::Tensor&, cudaStream_t, \
                                            const char*);
KVMEM_PAGED_DECODE_OTHER_PAIRS(KVMEM_PAGED_DECODE_EXTERN)
#undef KVMEM_PAGED_DECODE_EXTERN

#define KVMEM_PAGED_DECODE_INSTANTIATE(T, KV) \
  template void launch_decode<T, KV>(PagedDecodeParams&, int64_t, const at::Tensor&, cudaStream_t, const char*);

}  // namespace cuda
}  // namespace kvmem
