// Shared helpers for kvmem's C++ CPU kernels: dtype conversion, a floating-point dispatch macro,
// runtime CPU-ISA selection for the hot kernels, and a vectorisable exp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace kvmem {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Function attributes.
//
// Kernels are written as plain C++ loops (annotated with `#pragma omp simd`) inside always-inline
// helpers, and instantiated several times: once with the build's baseline ISA (portable, SSE2 on
// x86-64) and, on x86 with GCC/Clang, once more under `target("avx2,fma,f16c")` and once under an
// AVX-512 target. The compiler auto-vectorises each copy for its ISA; `cpu_isa()` picks the best
// copy the running CPU supports at runtime (no -march=native needed).
// ---------------------------------------------------------------------------------------------
#if defined(__GNUC__) || defined(__clang__)
#define KVMEM_INLINE inline __attribute__((always_inline))
#define KVMEM_RESTRICT __restrict__
#else
#define KVMEM_INLINE inline
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

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA level that both the CPU supports and the env var KVMEM_CPU_ISA allows
// ("baseline" | "avx2" | "avx512"; it can only lower the level). Computed once.
Isa cpu_isa();
const char* isa_name(Isa isa);

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

// dst[0:n] = float(src[0:n]) * mul
template <typename T>
KVMEM_INLINE void load_row_scaled(const T* KVMEM_RESTRICT src, float* KVMEM_RESTRICT dst, int n,
                                  float mul) {
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
// exp for the softmax inner loops: inlinable and auto-vectorisable (no libm call), |rel err| about
// 1 ulp. exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 in [-ln2/2, ln2/2] (ln2 split in
// a short high part and a correction so that n*ln2_hi is exact), exp(r) by its degree-7 Taylor
// polynomial (truncation error < 1e-8 on that interval). Results below 2^-126 flush to 0, so
// exp(-inf) == 0 (masked / empty states rely on this); x is clamped at 88 (no overflow to inf).
// ---------------------------------------------------------------------------------------------
KVMEM_INLINE float exp_fast(float x) {
  const float xc = x < 88.0f ? x : 88.0f;  // (a < b ? a : b is exactly minps: NaN passes through)
  const float t = xc * 1.44269504088896341f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer
  const float nf = (t + magic) - magic;
  const int32_t n = static_cast<int32_t>(float_to_bits(t + magic) - float_to_bits(magic));
  float r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  const float res = p * two_n;
  // Flush below 2^-126 (and -inf) to 0 with an integer mask: a select here could become a branch
  // and stop the loop from vectorising.
  const uint32_t keep = 0u - static_cast<uint32_t>(!(xc < -87.0f));
  return bits_to_float(float_to_bits(res) & keep);
}

// tanh(y) = sign(y) * (1 - e) / (1 + e), e = exp(-2|y|) (absolute error ~1e-7).
KVMEM_INLINE float tanh_fast(float y) {
  const float e = exp_fast(-2.0f * std::fabs(y));
  const float t = (1.0f - e) / (1.0f + e);
  return std::copysign(t, y);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Dispatch over the storage dtypes kvmem supports (fp32, bf16, fp16); binds `scalar_t`.
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

KVMEM_INLINE bool is_kvmem_float_type(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::BFloat16 ||
         t == at::ScalarType::Half;
}

// ---------------------------------------------------------------------------------------------
// CPU op entry points (registered in csrc/torch_bindings.cpp).
// ---------------------------------------------------------------------------------------------
void cache_write(const at::Tensor& k,            // [T, Hkv, D]
                 const at::Tensor& v,            // [T, Hkv, D]
                 at::Tensor& k_cache,            // [num_blocks, block_size, Hkv, D]
                 at::Tensor& v_cache,            // [num_blocks, block_size, Hkv, D]
                 const at::Tensor& slot_mapping  // [T] int64
);

void paged_attention(at::Tensor& out,                              // [T, Hq, D]
                     const std::optional<at::Tensor>& lse,         // [T, Hq] fp32
                     const at::Tensor& q,                          // [T, Hq, D]
                     const at::Tensor& k_cache,                    // [num_blocks, block_size, Hkv, D]
                     const at::Tensor& v_cache,                    // [num_blocks, block_size, Hkv, D]
                     const at::Tensor& block_table,                // [B, max_blocks] int32
                     const at::Tensor& seq_lens,                   // [B] int32
                     const at::Tensor& cu_seqlens_q,               // [B + 1] int32
                     int64_t max_seqlen_q, int64_t max_seqlen_k,   // host upper bounds (unused)
                     double scale, bool causal, int64_t window, double softcap,
                     const std::optional<at::Tensor>& sink_logits  // [Hq] fp32
);

void merge_states(at::Tensor& out,          // [T, H, D]
                  at::Tensor& lse,          // [T, H] fp32
                  const at::Tensor& out_a,  // [T, H, D]
                  const at::Tensor& lse_a,  // [T, H] fp32
                  const at::Tensor& out_b,  // [T, H, D]
                  const at::Tensor& lse_b   // [T, H] fp32
);

}  // namespace cpu
}  // namespace kvmem
