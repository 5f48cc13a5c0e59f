// CUDA glue for kvmem_C::cache_write (csrc/kernels/cache_write.cuh).
#include "cache_write/params_from_tensors.h"
#include "common/cuda_glue.h"
#include "kernels/cache_write.cuh"

namespace kvmem {
namespace cuda {

void cache_write(const at::Tensor& k,             // [T, Hkv, D]
                 const at::Tensor& v,             // [T, Hkv, D]
                 at::Tensor& k_cache,             // [num_blocks, block_size, Hkv, D]
                 at::Tensor& v_cache,             // [num_blocks, block_size, Hkv, D]
                 const at::Tensor& slot_mapping)  // [T] int64
{
  constexpr const char* kName = "kvmem_C::cache_write (CUDA)";
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && slot_mapping.is_cuda(),
              kName, ": tensors must be on CUDA");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(), kName, ": k, v and caches must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(), kName,
              ": slot_mapping must be contiguous int64");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
              kName, ": last dimensions must be contiguous");
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  if (k.size(0) == 0) return;
  const CacheWriteParams p = cache_write_params(k, v, k_cache, v_cache, slot_mapping);
  const bool vec_ok = aligned_16(k) && aligned_16(v) && aligned_16(k_cache) && aligned_16(v_cache) &&
                      (p.head_dim * k.element_size()) % 16 == 0;
  cudaStream_t stream = current_stream();
  dispatch_float_types(k.scalar_type(), kName, [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok) {
      cache_write_kernel<T, 16 / sizeof(T)><<<k.size(0), 128, 0, stream>>>(p);
    } else {
      cache_write_kernel<T, 1><<<k.size(0), 128, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CUDA, m) { m.impl("cache_write", &kvmem::cuda::cache_write); }
