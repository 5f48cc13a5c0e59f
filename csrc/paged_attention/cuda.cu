// CUDA glue for kvmem_C::paged_attention: split-K decode kernel (csrc/kernels/paged_decode.cuh).
// Handles any query segment length correctly (each query token is its own row), but is meant for
// decode and short speculative segments; the dispatcher sends long prefill elsewhere.
#include "common/cuda_glue.h"
#include "kernels/paged_decode.cuh"
#include "paged_attention/capabilities.h"
#include "paged_attention/params_from_tensors.h"

#include <string>

namespace kvmem {
namespace cuda {
namespace {

constexpr int kNumWarps = 4;
constexpr int kMinKeysPerSplit = 128;
constexpr int kMaxSplits = 128;

template <typename T, int D, int G_MAX, bool ROPE>
void launch(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t stream) {
  auto kernel = paged_decode_kernel<T, D, G_MAX, kNumWarps, ROPE>;
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
std::string head_dim_list() {
  std::string s;
  for (int d : kPagedAttentionCudaHeadDims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}

template <typename T, int D, bool ROPE>
void launch_group(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t s) {
  // G_MAX query heads per CTA: the smallest of {1, 2, 4, 8} holding the group (larger groups
  // are cut into chunks of 8).
  const int g = p.group;
  if (g <= 1) { p.head_chunks = 1; launch<T, D, 1, ROPE>(p, max_seqlen_k, q, s); }
  else if (g <= 2) { p.head_chunks = 1; launch<T, D, 2, ROPE>(p, max_seqlen_k, q, s); }
  else if (g <= 4) { p.head_chunks = 1; launch<T, D, 4, ROPE>(p, max_seqlen_k, q, s); }
  else { p.head_chunks = (g + 7) / 8; launch<T, D, 8, ROPE>(p, max_seqlen_k, q, s); }
}

template <typename T, int D>
void launch_rope_or_not(PagedDecodeParams& p, int64_t max_seqlen_k, const at::Tensor& q, cudaStream_t s) {
  if (p.rot_dim > 0) launch_group<T, D, true>(p, max_seqlen_k, q, s);
  else launch_group<T, D, false>(p, max_seqlen_k, q, s);
}

}  // namespace

void paged_attention(at::Tensor& out,                              // [T, Hq, D]
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
                     const std::optional<at::Tensor>& rope_cos_sin, // [num_positions, rot_dim] fp32
                     bool rope_neox
) {
  constexpr const char* kName = "kvmem_C::paged_attention (CUDA)";
  TORCH_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && out.is_cuda(), kName, ": tensors must be on CUDA");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(), kName, ": q, caches and out must share a dtype");
  TORCH_CHECK(aligned_16(q) && aligned_16(k_cache) && aligned_16(v_cache), kName,
              ": q and caches need 16-byte aligned rows");
  TORCH_CHECK(block_table.stride(1) == 1 && seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous(), kName,
              ": metadata must be contiguous");
  if (rope_cos_sin.has_value()) {
    const at::Tensor& cs = *rope_cos_sin;
    TORCH_CHECK(cs.is_cuda() && cs.scalar_type() == at::kFloat && cs.dim() == 2 && cs.stride(1) == 1 &&
                    cs.size(1) > 0 && cs.size(1) % 2 == 0 && cs.size(1) <= q.size(2) && cs.size(0) >= max_seqlen_k,
                kName, ": rope_cos_sin must be [>= max_seqlen_k, even rot_dim <= head_dim] fp32 on CUDA, unit stride");
  }
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  PagedDecodeParams p{};
  static_cast<PagedAttentionParams&>(p) =
      paged_attention_params(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                             max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                             rope_cos_sin, rope_neox);
  if (q.size(0) == 0) return;
  cudaStream_t stream = current_stream();
  const int64_t D = q.size(2);
  dispatch_half_types(q.scalar_type(), kName, [&](auto tag) {
    using T = decltype(tag);
    switch (D) {
#define KVMEM_HEAD_DIM_CASE(d) \
  case d: launch_rope_or_not<T, d>(p, max_seqlen_k, q, stream); break;
      KVMEM_PAGED_ATTENTION_CUDA_HEAD_DIMS(KVMEM_HEAD_DIM_CASE)
#undef KVMEM_HEAD_DIM_CASE
      default: TORCH_CHECK(false, kName, ": head_dim must be one of ", head_dim_list(), "; got ", D);
    }
  });
}

}  // namespace cuda
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CUDA, m) { m.impl("paged_attention", &kvmem::cuda::paged_attention); }
