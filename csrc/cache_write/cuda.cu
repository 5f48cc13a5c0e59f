// CUDA glue for kvmem_C::cache_write (csrc/kernels/cache_write.cuh).
#include "cuda/cuda_utils.h"
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
  CacheWriteParams p{};
  p.k = k.data_ptr(); p.v = v.data_ptr(); p.k_cache = k_cache.data_ptr(); p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.k_stride_t = k.stride(0); p.k_stride_h = k.stride(1); p.v_stride_t = v.stride(0); p.v_stride_h = v.stride(1);
  p.kc_stride_b = k_cache.stride(0); p.kc_stride_s = k_cache.stride(1); p.kc_stride_h = k_cache.stride(2);
  p.vc_stride_b = v_cache.stride(0); p.vc_stride_s = v_cache.stride(1); p.vc_stride_h = v_cache.stride(2);
  p.num_kv_heads = k.size(1); p.head_dim = k.size(2); p.block_size = k_cache.size(1);
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
