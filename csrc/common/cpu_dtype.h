// Storage dtypes of kvmem's C++ CPU kernels (fp32, bf16, fp16, and the float8 cache formats
// e4m3fn / e5m2; math always in fp32): scalar and row conversions, and the dispatch macros.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/fp8.h"
#include "common/kernel_facts.h"

namespace kvmem {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Dtype helpers. Storage dtypes: float, c10::BFloat16, c10::Half. Math is always fp32.
// ---------------------------------------------------------------------------------------------
KVMEM_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
KVMEM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// bf16 -> fp32: the bf16 bits are the high half of the fp32 bits.
KVMEM_INLINE float bf16_bits_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// IEEE fp16 -> fp32, exact for all 65536 inputs, and branch-free (integer masks, no selects that
// the compiler could turn into branches) so that conversion loops vectorise:
//   normal:    exponent rebias 15 -> 127, i.e. bits' = (bits << 13) + (112 << 23)
//   inf / NaN: exponent 31 -> 255,       i.e. bits' = (bits << 13) + (224 << 23)
//   zero / subnormal: value = mantissa * 2^-24 (an exact int -> float conversion)
KVMEM_INLINE float fp16_bits_to_float(uint16_t h) {
  const uint32_t x = h;
  const uint32_t sign = (x & 0x8000u) << 16;
  const uint32_t em = x & 0x7fffu;
  const uint32_t inf_nan = 0u - uint32_t(em >= 0x7c00u);  // all ones or zero
  const uint32_t tiny = 0u - uint32_t(em < 0x0400u);
  const uint32_t normal_bits = (em << 13) + (112u << 23) + (inf_nan & (112u << 23));
  const uint32_t tiny_bits =
      float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f);
  return bits_to_float((tiny_bits & tiny) | (normal_bits & ~tiny) | sign);
}

// float8 cache elements (the bits; common/fp8.h encodes and decodes them).
struct Fp8E4M3 {
  uint8_t x;
};
struct Fp8E5M2 {
  uint8_t x;
};
template <typename T>
inline constexpr bool is_fp8_v = std::is_same_v<T, Fp8E4M3> || std::is_same_v<T, Fp8E5M2>;

KVMEM_INLINE float to_float(Fp8E4M3 x) { return fp8::decode<fp8::kE4M3>(x.x); }
KVMEM_INLINE float to_float(Fp8E5M2 x) { return fp8::decode<fp8::kE5M2>(x.x); }

KVMEM_INLINE float to_float(float x) { return x; }
KVMEM_INLINE float to_float(c10::BFloat16 x) { return bf16_bits_to_float(x.x); }
KVMEM_INLINE float to_float(c10::Half x) { return fp16_bits_to_float(x.x); }

// fp32 -> storage dtype, round-to-nearest-even (c10's conversions; used on output rows only).
template <typename T>
KVMEM_INLINE T from_float(float x) {
  return static_cast<T>(x);
}
template <>
KVMEM_INLINE float from_float<float>(float x) {
  return x;
}
template <>
KVMEM_INLINE Fp8E4M3 from_float<Fp8E4M3>(float x) {
  return Fp8E4M3{fp8::encode<fp8::kE4M3>(x)};
}
template <>
KVMEM_INLINE Fp8E5M2 from_float<Fp8E5M2>(float x) {
  return Fp8E5M2{fp8::encode<fp8::kE5M2>(x)};
}

// kvmem's one encoding of a scaled value into storage dtype T (kvmem/ops/_common.py encode):
// clamp to +- T's largest finite value, then round to nearest even. fp32: unchanged except that
// +-inf clamps to +-FLT_MAX.
template <typename T>
KVMEM_INLINE T encode_clamped(float x) {
  if constexpr (is_fp8_v<T>) {
    return from_float<T>(x);  // fp8::encode clamps
  } else {
    constexpr float big = std::is_same_v<T, float> ? 3.4028234663852886e38f
                          : std::is_same_v<T, c10::BFloat16> ? 3.3895313892515355e38f
                                                             : 65504.0f;
    if (x != x) return from_float<T>(x);  // NaN stays NaN
    return from_float<T>(x > big ? big : (x < -big ? -big : x));
  }
}

// dst[0:n] = float(src[0:n]) * mul
template <typename T>
KVMEM_INLINE void load_row_scaled(const T* KVMEM_RESTRICT src, float* KVMEM_RESTRICT dst, int n,
                                  float mul) {
  // float8 rows load through cpu_vec.inc's load_row_v (vectorised; e4m3fn in units of 2^8).
  static_assert(!is_fp8_v<T>, "float8 rows: use load_row_v");
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int i = 0; i < n; ++i) dst[i] = src[i] * mul;
  } else {
    const uint16_t* KVMEM_RESTRICT s = reinterpret_cast<const uint16_t*>(src);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]) * mul;
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = fp16_bits_to_float(s[i]) * mul;
    }
  }
}

// dst[0:n] = float(src[0:n])
template <typename T>
KVMEM_INLINE void load_row(const T* KVMEM_RESTRICT src, float* KVMEM_RESTRICT dst, int n) {
  static_assert(!is_fp8_v<T>, "float8 rows: use load_row_v");
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    const uint16_t* KVMEM_RESTRICT s = reinterpret_cast<const uint16_t*>(src);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = fp16_bits_to_float(s[i]);
    }
  }
}

// dst[0:n] = T(src[0:n] * mul)
template <typename T>
KVMEM_INLINE void store_row_scaled(const float* KVMEM_RESTRICT src, T* KVMEM_RESTRICT dst, int n,
                                   float mul) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int i = 0; i < n; ++i) dst[i] = src[i] * mul;
  } else {
    for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i] * mul);
  }
}

template <typename T>
KVMEM_INLINE void fill_zero_row(T* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(0.0f);
}

// ---------------------------------------------------------------------------------------------
// Dispatch over the storage dtypes kvmem supports (fp32, bf16, fp16; kFloatDtypeNames in
// common/kernel_facts.h, reported by build_info); binds `scalar_t`.
// ---------------------------------------------------------------------------------------------
#define KVMEM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                 \
  [&] {                                                                             \
    const at::ScalarType _kvmem_st = (TYPE);                                        \
    switch (_kvmem_st) {                                                            \
      case at::ScalarType::Float: {                                                 \
        using scalar_t = float;                                                     \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::ScalarType::BFloat16: {                                              \
        using scalar_t = c10::BFloat16;                                             \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::ScalarType::Half: {                                                  \
        using scalar_t = c10::Half;                                                 \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      default:                                                                      \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", _kvmem_st,                 \
                    " (expected float32, bfloat16 or float16)");                    \
    }                                                                               \
  }()

// Dispatch over the KV-cache storage dtypes (kCacheDtypeNames in common/kernel_facts.h): the
// float dtypes and the float8 formats; binds `cache_t`.
#define KVMEM_DISPATCH_CACHE_TYPES(TYPE, NAME, ...)                                 \
  [&] {                                                                             \
    const at::ScalarType _kvmem_ct = (TYPE);                                        \
    switch (_kvmem_ct) {                                                            \
      case at::ScalarType::Float: {                                                 \
        using cache_t = float;                                                      \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::ScalarType::BFloat16: {                                              \
        using cache_t = c10::BFloat16;                                              \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::ScalarType::Half: {                                                  \
        using cache_t = c10::Half;                                                  \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::ScalarType::Float8_e4m3fn: {                                         \
        using cache_t = ::kvmem::cpu::Fp8E4M3;                                      \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::ScalarType::Float8_e5m2: {                                           \
        using cache_t = ::kvmem::cpu::Fp8E5M2;                                      \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      default:                                                                      \
        TORCH_CHECK(false, NAME, ": unsupported cache dtype ", _kvmem_ct,           \
                    " (expected float32, bfloat16, float16, float8_e4m3fn or float8_e5m2)"); \
    }                                                                               \
  }()

KVMEM_INLINE bool is_kvmem_cache_type(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::BFloat16 ||
         t == at::ScalarType::Half || t == at::ScalarType::Float8_e4m3fn ||
         t == at::ScalarType::Float8_e5m2;
}

KVMEM_INLINE bool is_kvmem_float_type(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::BFloat16 ||
         t == at::ScalarType::Half;
}

}  // namespace cpu
}  // namespace kvmem
