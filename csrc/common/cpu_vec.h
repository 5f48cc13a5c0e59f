// GCC/Clang vector types for kvmem's CPU kernels (ISA-independent; the per-ISA primitives on them
// are in cpu_vec.inc).
#pragma once

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define KVMEM_HAVE_SHUFFLEVECTOR 1
#else
#define KVMEM_HAVE_SHUFFLEVECTOR 0
#endif

namespace kvmem {
namespace cpu {

// N fp32 lanes.
template <int N>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * N)));
};

}  // namespace cpu
}  // namespace kvmem
