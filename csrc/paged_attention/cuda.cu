// CUDA glue for kvmem_C::paged_attention: split-K decode kernel (csrc/kernels/paged_decode.cuh).
// Handles any query segment length correctly (each query token is its own row), but is meant for
// decode and short speculative segments; the dispatcher sends long prefill elsewhere.
// The decode kernels of each (q dtype, cache dtype) pair are compiled in their own translation unit
// (cuda_launch.cuh); this one holds the glue and the pairs with the cache in q's dtype.
#include "paged_attention/cuda_launch.cuh"
#include "paged_attention/params_from_tensors.h"

namespace kvmem {
namespace cuda {
namespace {

// One fp32 scale: 0-d or [Hkv], on CUDA.
void check_scale(const std::optional<at::Tensor>& scale, int64_t num_kv_heads, const char* what, const char* name) {
  if (!scale.has_value()) return;
  const at::Tensor& s = *scale;
  TORCH_CHECK(s.is_cuda() && s.scalar_type() == at::kFloat && (s.dim() == 0 || (s.dim() == 1 && s.size(0) == num_kv_heads)),
              name, ": ", what, " must be a 0-d or [num_kv_heads] fp32 CUDA tensor");
}

// launch_decode<T, KV> for the cache dtype (q's T, with or without scales; the other 16-bit float;
// float8).
template <typename T>
void launch_for_cache(at::ScalarType cache_dtype, at::ScalarType q_dtype, PagedDecodeParams& p, int64_t max_seqlen_k,
                      const at::Tensor& q, cudaStream_t stream, const char* name) {
  if (cache_dtype == q_dtype && p.k_scale == nullptr && p.v_scale == nullptr) {
    launch_decode<T, T>(p, max_seqlen_k, q, stream, name);  // the plain path
  } else if (cache_dtype == q_dtype) {
    launch_decode<T, scaled<T>>(p, max_seqlen_k, q, stream, name);
  } else if (cache_dtype == at::kFloat8_e4m3fn) {
    launch_decode<T, fp8_e4m3>(p, max_seqlen_k, q, stream, name);
  } else if (cache_dtype == at::kFloat8_e5m2) {
    launch_decode<T, fp8_e5m2>(p, max_seqlen_k, q, stream, name);
  } else if (cache_dtype == at::kHalf && q_dtype == at::kBFloat16) {
    launch_decode<__nv_bfloat16, __half>(p, max_seqlen_k, q, stream, name);
  } else if (cache_dtype == at::kBFloat16 && q_dtype == at::kHalf) {
    launch_decode<__half, __nv_bfloat16>(p, max_seqlen_k, q, stream, name);
  } else {
    TORCH_CHECK(false, name, ": caches of ", cache_dtype, " under q of ", q_dtype,
                " are not built (float16, bfloat16, float8_e4m3fn, float8_e5m2 caches are)");
  }
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
                     const std::optional<at::Tensor>& k_scale,      // 0-d or [Hkv] fp32
                     const std::optional<at::Tensor>& v_scale,      // 0-d or [Hkv] fp32
                     const std::optional<at::Tensor>& rope_cos_sin, // [num_positions, rot_dim] fp32
                     bool rope_neox
) {
  constexpr const char* kName = "kvmem_C::paged_attention (CUDA)";
  TORCH_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && out.is_cuda(), kName, ": tensors must be on CUDA");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(), kName,
              ": out must be of q's dtype, v_cache of k_cache's");
  check_scale(k_scale, k_cache.size(2), "k_scale", kName);
  check_scale(v_scale, k_cache.size(2), "v_scale", kName);
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
                             k_scale, v_scale, rope_cos_sin, rope_neox);
  if (q.size(0) == 0) return;
  cudaStream_t stream = current_stream();
  dispatch_half_types(q.scalar_type(), kName, [&](auto tag) {
    launch_for_cache<decltype(tag)>(k_cache.scalar_type(), q.scalar_type(), p, max_seqlen_k, q, stream, kName);
  });
}

}  // namespace cuda
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CUDA, m) { m.impl("paged_attention", &kvmem::cuda::paged_attention); }
