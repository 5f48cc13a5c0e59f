// CUDA glue for kvmem_C::cache_write (csrc/kernels/cache_write.cuh).
#include "cache_write/params_from_tensors.h"
#include "common/cuda_glue.h"
#include "kernels/cache_write.cuh"

namespace kvmem {
namespace cuda {
namespace {

// Calls fn(C{}) with C the CUDA element type of a cache dtype (a float type, or float8 bits).
template <typename Fn>
void dispatch_cache_types(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::ScalarType::Float8_e4m3fn: fn(fp8_e4m3{}); break;
    case at::ScalarType::Float8_e5m2: fn(fp8_e5m2{}); break;
    default: dispatch_float_types(dtype, name, fn);
  }
}

// Whether the tensor's rows start on `bytes`-byte boundaries (bytes a power of two <= 16).
bool aligned_to(const at::Tensor& t, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if ((t.stride(i) * t.element_size()) % bytes != 0) return false;
  return t.stride(-1) == 1;
}

}  // namespace

void cache_write(const at::Tensor& k,                        // [T, Hkv, D]
                 const at::Tensor& v,                        // [T, Hkv, D]
                 at::Tensor& k_cache,                        // [num_blocks, block_size, Hkv, D]
                 at::Tensor& v_cache,                        // [num_blocks, block_size, Hkv, D]
                 const at::Tensor& slot_mapping,             // [T] int64
                 const std::optional<at::Tensor>& k_scale,   // 0-d or [Hkv] fp32
                 const std::optional<at::Tensor>& v_scale)   // 0-d or [Hkv] fp32
{
  constexpr const char* kName = "kvmem_C::cache_write (CUDA)";
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && slot_mapping.is_cuda(),
              kName, ": tensors must be on CUDA");
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(), kName,
              ": v must be of k's dtype, v_cache of k_cache's");
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), kName, ": k_scale and v_scale are given together");
  for (const auto* s : {&k_scale, &v_scale}) {
    if (s->has_value()) {
      const at::Tensor& t = **s;
      TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat &&
                      (t.dim() == 0 || (t.dim() == 1 && t.size(0) == k_cache.size(2))),
                  kName, ": k_scale / v_scale must be 0-d or [num_kv_heads] fp32 CUDA tensors");
    }
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(), kName,
              ": slot_mapping must be contiguous int64");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
              kName, ": last dimensions must be contiguous");
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  if (k.size(0) == 0) return;
  const CacheWriteParams p = cache_write_params(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  cudaStream_t stream = current_stream();
  const bool copy = k.scalar_type() == k_cache.scalar_type() && !k_scale.has_value();
  dispatch_float_types(k.scalar_type(), kName, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    // 16-byte loads of k and v; stores of VEC cache elements aligned to their size (up to 16)
    const bool src_ok = aligned_16(k) && aligned_16(v) && (p.head_dim * k.element_size()) % 16 == 0;
    const int64_t dst_bytes = std::min<int64_t>(16, VEC * k_cache.element_size());
    const bool vec_ok = src_ok && aligned_to(k_cache, dst_bytes) && aligned_to(v_cache, dst_bytes);
    if (copy) {
      if (vec_ok) {
        cache_write_kernel<T, VEC><<<k.size(0), 128, 0, stream>>>(p);
      } else {
        cache_write_kernel<T, 1><<<k.size(0), 128, 0, stream>>>(p);
      }
    } else {
      dispatch_cache_types(k_cache.scalar_type(), kName, [&](auto cache_tag) {
        using C = decltype(cache_tag);
        if (vec_ok) {
          cache_write_convert_kernel<T, C, VEC><<<k.size(0), 128, 0, stream>>>(p);
        } else {
          cache_write_convert_kernel<T, C, 1><<<k.size(0), 128, 0, stream>>>(p);
        }
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CUDA, m) { m.impl("cache_write", &kvmem::cuda::cache_write); }
