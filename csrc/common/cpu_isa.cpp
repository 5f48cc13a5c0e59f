// Runtime CPU-ISA detection for the kernels' per-ISA copies (cpu_isa.h).
#include "common/cpu_isa.h"

#include <cstdlib>
#include <string>

namespace kvmem {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

static Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if KVMEM_X86_MULTIVERSION
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2) best = Isa::kAvx2;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = Isa::kAvx512;
  }
#endif
  if (const char* env = std::getenv("KVMEM_CPU_ISA")) {
    const std::string s(env);
    Isa cap = best;
    if (s == "baseline" || s == "default" || s == "none") cap = Isa::kBaseline;
    else if (s == "avx2") cap = Isa::kAvx2;
    else if (s == "avx512") cap = Isa::kAvx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace cpu
}  // namespace kvmem
