// paged_attention's CUDA decode kernels for caches of q's dtype read with k_scale / v_scale
// (csrc/paged_attention/cuda_launch.cuh; the glue is cuda.cu).
#include "paged_attention/cuda_launch.cuh"

namespace kvmem {
namespace cuda {
KVMEM_PAGED_DECODE_INSTANTIATE(__half, scaled<__half>)
KVMEM_PAGED_DECODE_INSTANTIATE(__nv_bfloat16, scaled<__nv_bfloat16>)
}  // namespace cuda
}  // namespace kvmem
