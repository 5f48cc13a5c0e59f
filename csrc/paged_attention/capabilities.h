// What kvmem_C::paged_attention's compiled kernels accept, stated once: the CUDA glue's head-dim
// switch (cuda.cu) and build_info() (csrc/torch_bindings.cpp) both expand this list. No torch or
// CUDA headers.
#pragma once

// X(d) for every head dim the CUDA decode kernel is instantiated for.
#define KVMEM_PAGED_ATTENTION_CUDA_HEAD_DIMS(X) X(64) X(80) X(96) X(112) X(128) X(256)

namespace kvmem {

#define KVMEM_HEAD_DIM_ENTRY(d) d,
inline constexpr int kPagedAttentionCudaHeadDims[] = {
    KVMEM_PAGED_ATTENTION_CUDA_HEAD_DIMS(KVMEM_HEAD_DIM_ENTRY)};
#undef KVMEM_HEAD_DIM_ENTRY

}  // namespace kvmem
