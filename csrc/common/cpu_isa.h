// CPU instruction sets for kvmem's C++ kernels: function attributes, the runtime ISA choice, and
// the macro that picks a kernel's per-ISA copy (see cpu_per_isa.h for how the copies are made).
//
// Kernels are written as plain C++ loops and GCC/Clang vector extensions inside always-inline
// helpers, and compiled several times: once for the build's baseline ISA (portable, SSE2 on
// x86-64) and, on x86 with GCC/Clang, once more for AVX2+FMA and once for AVX-512. The compiler
// auto-vectorises each copy for its ISA; cpu_isa() picks the best copy the running CPU supports
// (no -march=native needed).
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define KVMEM_INLINE inline __attribute__((always_inline))
#define KVMEM_NOINLINE __attribute__((noinline))
#define KVMEM_RESTRICT __restrict__
#else
#define KVMEM_INLINE inline
#define KVMEM_NOINLINE
#define KVMEM_RESTRICT
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define KVMEM_X86_MULTIVERSION 1
#define KVMEM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVMEM_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define KVMEM_X86_MULTIVERSION 0
#endif

namespace kvmem {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA level that both the CPU supports and the env var KVMEM_CPU_ISA allows
// ("baseline" | "avx2" | "avx512"; it can only lower the level). Computed once.
Isa cpu_isa();
const char* isa_name(Isa isa);

// The copy of a kernel for the running CPU's ISA (cpu_isa()).
template <typename Fn>
inline Fn pick_isa(Fn baseline, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return baseline;
  }
}

}  // namespace cpu
}  // namespace kvmem

// &NS::isa_<name>::FN for the running CPU, NS being the namespace (inside kvmem::cpu) that
// cpu_per_isa.h instantiated a kernel body in. FN may be a template-id; write its commas as
// KVMEM_COMMA (process_item<T KVMEM_COMMA true>).
#define KVMEM_COMMA ,
#if KVMEM_X86_MULTIVERSION
#define KVMEM_PICK_ISA(NS, FN) \
  ::kvmem::cpu::pick_isa(&NS::isa_baseline::FN, &NS::isa_avx2::FN, &NS::isa_avx512::FN)
#else
#define KVMEM_PICK_ISA(NS, FN) (&NS::isa_baseline::FN)
#endif
