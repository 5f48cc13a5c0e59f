// Compile a CPU kernel body once per ISA. Usage, in an op's cpu.cpp, after the op's shared
// (ISA-independent) definitions:
//
//   #define KVMEM_PER_ISA_NS pa                                // namespace in kvmem::cpu
//   #define KVMEM_PER_ISA_BODY "paged_attention/cpu_kernel.inc"
//   #include "common/cpu_per_isa.h"
//   ... KVMEM_PICK_ISA(pa, process_item<T>) ...               // the copy for this CPU
//
// The body is included into kvmem::cpu::<NS>::isa_<name>::{anonymous} (internal linkage: no PLT
// calls between the kernels) for the baseline ISA (KVMEM_W = 4 fp32 lanes, SSE2 on x86-64) and,
// on x86 with GCC/Clang, under `#pragma GCC target` (clang: `attribute push`) for AVX2+FMA
// (KVMEM_W = 8) and for AVX-512 (KVMEM_W = 16), each time after this ISA's vector primitives
// (cpu_vec.inc) and online softmax (cpu_online_softmax.inc). The body is plain C++ (fixed-width
// inner loops, vector extensions for horizontal sums) that the compiler vectorises per target.
//
// No include guard: a translation unit may instantiate several bodies (define the two macros
// again before each include).
#include "common/cpu_dtype.h"
#include "common/cpu_isa.h"
#include "common/cpu_math.h"
#include "common/cpu_vec.h"

#if KVMEM_X86_MULTIVERSION
#include <immintrin.h>  // F16C conversions in the AVX2 / AVX-512 copies (cpu_vec.inc)
#endif

#if !defined(KVMEM_PER_ISA_NS) || !defined(KVMEM_PER_ISA_BODY)
#error "define KVMEM_PER_ISA_NS and KVMEM_PER_ISA_BODY before including common/cpu_per_isa.h"
#endif

#define KVMEM_W 4  // SSE2: 4 fp32 lanes
namespace kvmem {
namespace cpu {
namespace KVMEM_PER_ISA_NS {
namespace isa_baseline {
namespace {
#include "common/cpu_vec.inc"
#include "common/cpu_online_softmax.inc"
#include KVMEM_PER_ISA_BODY
}  // namespace
}  // namespace isa_baseline
}  // namespace KVMEM_PER_ISA_NS
}  // namespace cpu
}  // namespace kvmem
#undef KVMEM_W

#if KVMEM_X86_MULTIVERSION
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define KVMEM_W 8
namespace kvmem {
namespace cpu {
namespace KVMEM_PER_ISA_NS {
namespace isa_avx2 {
namespace {
#include "common/cpu_vec.inc"
#include "common/cpu_online_softmax.inc"
#include KVMEM_PER_ISA_BODY
}  // namespace
}  // namespace isa_avx2
}  // namespace KVMEM_PER_ISA_NS
}  // namespace cpu
}  // namespace kvmem
#undef KVMEM_W
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(                                                     \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define KVMEM_W 16
namespace kvmem {
namespace cpu {
namespace KVMEM_PER_ISA_NS {
namespace isa_avx512 {
namespace {
#include "common/cpu_vec.inc"
#include "common/cpu_online_softmax.inc"
#include KVMEM_PER_ISA_BODY
}  // namespace
}  // namespace isa_avx512
}  // namespace KVMEM_PER_ISA_NS
}  // namespace cpu
}  // namespace kvmem
#undef KVMEM_W
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // KVMEM_X86_MULTIVERSION

#undef KVMEM_PER_ISA_NS
#undef KVMEM_PER_ISA_BODY
