// paged_attention's CUDA decode kernels for float8_e4m3fn caches (csrc/paged_attention/cuda_launch.cuh;
// the glue is cuda.cu).
#include "paged_attention/cuda_launch.cuh"

namespace kvmem {
namespace cuda {
KVMEM_PAGED_DECODE_INSTANTIATE(__half, fp8_e4m3)
KVMEM_PAGED_DECODE_INSTANTIATE(__nv_bfloat16, fp8_e4m3)
}  // namespace cuda
}  // namespace kvmem
