// float8 cache encoding (e4m3fn, e5m2) in integer bit operations, shared by the CPU and CUDA
// kernels (host and device, no torch headers). The spec is kvmem/ops/_common.py's encode():
//   x (fp32, already divided by its scale) clamped to +- the format's largest finite value,
//   then rounded to nearest, ties to even; NaN stays NaN (sign kept, code 0x7F | sign), -0.0
//   stays -0.0, +-inf becomes +-max. Decoding is exact (every code is an fp32 value).
// Formats (bias, mantissa bits, largest finite, smallest normal):
//   e4m3fn: 7, 3, 448 (0x7E), 2^-6;  no inf, NaN = 0x7F / 0xFF
//   e5m2:  15, 2, 57344 (0x7B), 2^-14; inf = 0x7C / 0xFC, NaN = 0x7D..0x7F (| sign)
// Both are checked bit-exactly against the reference over all 256 codes, midpoints and
// out-of-range inputs (tests/ops/test_fp8_encoding.py).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KVMEM_FP8_FN __host__ __device__ __forceinline__
#else
#define KVMEM_FP8_FN inline __attribute__((always_inline))
#endif

namespace kvmem {
namespace fp8 {

enum Format : int { kE4M3 = 0, kE5M2 = 1 };

KVMEM_FP8_FN float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

KVMEM_FP8_FN uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Per format: mantissa bits M, exponent rebias to fp32 (127 - bias), largest finite magnitude
// bits (fp32) and the smallest normal's fp32 bits; subnormal step 2^(1 - bias - M).
template <int F>
struct Traits;
template <>
struct Traits<kE4M3> {
  static constexpr int M = 3;
  static constexpr uint32_t rebias = 120;         // 127 - 7
  static constexpr uint32_t max_bits = 0x43E00000u;  // 448.0f
  static constexpr uint32_t min_normal_bits = 0x3C800000u;  // 2^-6
  static constexpr float sub_step = 0.001953125f;     // 2^-9
  static constexpr float sub_inv = 512.0f;
};
template <>
struct Traits<kE5M2> {
  static constexpr int M = 2;
  static constexpr uint32_t rebias = 112;         // 127 - 15
  static constexpr uint32_t max_bits = 0x47600000u;  // 57344.0f
  static constexpr uint32_t min_normal_bits = 0x38800000u;  // 2^-14
  static constexpr float sub_step = 1.52587890625e-05f;  // 2^-16
  static constexpr float sub_inv = 65536.0f;
};

// fp32 -> code (clamp, then round to nearest even). Branch-free apart from selects.
template <int F>
KVMEM_FP8_FN uint8_t encode(float x) {
  using Tr = Traits<F>;
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);  // NaN
  if (a > Tr::max_bits) a = Tr::max_bits;                          // +-inf and out of range
  uint32_t code;
  if (a >= Tr::min_normal_bits) {
    constexpr int drop = 23 - Tr::M;
    const uint32_t r = a + ((1u << (drop - 1)) - 1u) + ((a >> drop) & 1u);  // RNE on the bits
    code = (r >> drop) - (Tr::rebias << Tr::M);
  } else {
    // subnormal: code = RNE(|x| / step), an exact product; 2^23 + y rounds y (< 2^23) to an
    // integer with the FPU's nearest-even rounding.
    const float y = bits_f32(a) * Tr::sub_inv;
    code = f32_bits(y + 8388608.0f) - 0x4B000000u;
  }
  return static_cast<uint8_t>(sign | code);
}

// code -> fp32 (exact).
template <int F>
KVMEM_FP8_FN float decode(uint8_t b) {
  using Tr = Traits<F>;
  const uint32_t x = b;
  const uint32_t sign = (x & 0x80u) << 24;
  const uint32_t em = x & 0x7fu;
  constexpr uint32_t sub_limit = 1u << Tr::M;  // exponent field 0 below this
  uint32_t bits;
  if (F == kE4M3) {
    const uint32_t normal = (em << (23 - Tr::M)) + (Tr::rebias << 23);
    const uint32_t tiny = f32_bits(static_cast<float>(static_cast<int32_t>(em)) * Tr::sub_step);
    bits = em < sub_limit ? tiny : normal;
    bits = em == 0x7fu ? 0x7fc00000u : bits;
  } else {
    const uint32_t normal = (em << (23 - Tr::M)) + (Tr::rebias << 23);
    const uint32_t special = (em << (23 - Tr::M)) + (224u << 23);  // exponent 31 -> 255
    const uint32_t tiny = f32_bits(static_cast<float>(static_cast<int32_t>(em)) * Tr::sub_step);
    bits = em < sub_limit ? tiny : (em >= 0x7cu ? special : normal);
  }
  return bits_f32(bits | sign);
}

}  // namespace fp8
}  // namespace kvmem
