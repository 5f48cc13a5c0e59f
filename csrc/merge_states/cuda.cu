// CUDA glue for kvmem_C::merge_states (csrc/kernels/merge_states.cuh).
#include "common/cuda_glue.h"
#include "kernels/merge_states.cuh"
#include "merge_states/params_from_tensors.h"

namespace kvmem {
namespace cuda {

void merge_states(at::Tensor& out,          // [T, H, D]
                  at::Tensor& lse,          // [T, H] fp32
                  const at::Tensor& out_a,  // [T, H, D]
                  const at::Tensor& lse_a,  // [T, H] fp32
                  const at::Tensor& out_b,  // [T, H, D]
                  const at::Tensor& lse_b)  // [T, H] fp32
{
  constexpr const char* kName = "kvmem_C::merge_states (CUDA)";
  TORCH_CHECK(out.is_cuda() && out_a.is_cuda() && out_b.is_cuda(), kName, ": tensors must be on CUDA");
  TORCH_CHECK(out.stride(-1) == 1 && out_a.stride(-1) == 1 && out_b.stride(-1) == 1, kName,
              ": last dimensions must be contiguous");
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  const MergeStatesParams p = merge_states_params(out, lse, out_a, lse_a, out_b, lse_b);
  const int threads = std::min<int>(256, std::max<int>(32, p.head_dim));
  cudaStream_t stream = current_stream();
  dispatch_float_types(out.scalar_type(), kName, [&](auto tag) {
    using T = decltype(tag);
    merge_states_kernel<T><<<dim3(out.size(0), out.size(1)), threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CUDA, m) { m.impl("merge_states", &kvmem::cuda::merge_states); }
