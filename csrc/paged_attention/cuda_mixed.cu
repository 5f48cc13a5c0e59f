// paged_attention's CUDA decode kernels for 16-bit caches of the other 16-bit dtype than q
// (csrc/paged_attention/cuda_launch.cuh; the glue is cuda.cu).
#include "paged_attention/cuda_launch.cuh"

namespace kvmem {
namespace cuda {
KVMEM_PAGED_DECODE_INSTANTIATE(__half, __nv_bfloat16)
KVMEM_PAGED_DECODE_INSTANTIATE(__nv_bfloat16, __half)
}  // namespace cuda
}  // namespace kvmem
