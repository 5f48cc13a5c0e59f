// Cache element types of kvmem's CUDA attention kernels and their loads: a K/V cache may be of
// q's dtype, of the other 16-bit float, or float8 (e4m3fn / e5m2 bits in uint8 storage). Device
// code (plus the host-callable bit tricks below), no torch headers.
//
// A kernel reads a row in the channel layout of q's dtype T: vectors of VEC = 16 / sizeof(T)
// channels, i.e. VEC * sizeof(KV) bytes of cache per vector (16 for 16-bit caches, 8 for float8).
// kv_unpack<KV, VEC> turns one raw vector into VEC floats *times kv_decode_mul<KV>()*:
//   16-bit: the value (kv_decode_mul = 1)
//   e5m2:   the byte is the high byte of the fp16 with the same value (exact, inf/NaN included)
//   e4m3fn: sign << 15 | (exponent, mantissa) << 7 is the fp16 of value * 2^-8 (normals and
//           subnormals alike, exact); NaN (0x7F | sign) is selected back to NaN. kv_decode_mul =
//           2^-8: the kernel multiplies it back (exactly, a power of two) folded into its scale.
// Every finite code gives exactly common/fp8.h's decode(code) * kv_decode_mul, NaN gives NaN
// (tools/check_fp8_decode.cu checks all 256 codes on the host).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "common/cuda_vec.cuh"
#include "common/fp8.h"

namespace kvmem {

// float8 cache elements (one byte of bits each).
struct alignas(1) fp8_e4m3 { uint8_t bits; };
struct alignas(1) fp8_e5m2 { uint8_t bits; };
// A cache of q's own 16-bit dtype T read with k_scale / v_scale: T's layout and loads, but its own
// kernel instantiation, so the plain KV = T kernels carry no scale code at all.
template <typename T>
struct alignas(sizeof(T)) scaled { T x; };
template <typename KV> struct is_scaled : std::false_type {};
template <typename T> struct is_scaled<scaled<T>> : std::true_type {};

// The raw vector of VEC elements of KV (16 or 8 bytes).
template <typename KV, int VEC>
struct KvRaw {
  static_assert(VEC * sizeof(KV) == 16 || VEC * sizeof(KV) == 8, "a cache vector is 16 or 8 bytes");
  using type = typename std::conditional<VEC * sizeof(KV) == 16, uint4, uint2>::type;
};

// The factor kv_unpack's floats carry (the kernel multiplies by its inverse once).
template <typename KV> __host__ __device__ constexpr float kv_decode_mul() { return 1.f; }
template <> __host__ __device__ constexpr float kv_decode_mul<fp8_e4m3>() { return 0.00390625f; }  // 2^-8

// Four float8 codes (bytes of w, lowest first) as two pairs of fp16 bits (lo: codes 0, 1; hi: 2, 3)
// of value * kv_decode_mul; e4m3 NaN codes come out as the finite fp16 1.875 * 2^0 (|code| 0x7F),
// kv_fp8_nan_fix turns them back into NaN.
template <int F>
__host__ __device__ __forceinline__ void fp8x4_to_half2_bits(uint32_t w, uint32_t& lo, uint32_t& hi) {
  // bytes 0, 1 -> bits 0-7, 16-23 (lo); bytes 2, 3 -> same (hi)
  const uint32_t p_lo = (w & 0x000000ffu) | ((w & 0x0000ff00u) << 8);
  const uint32_t p_hi = ((w & 0x00ff0000u) >> 16) | ((w & 0xff000000u) >> 8);
  if (F == fp8::kE5M2) {
    lo = p_lo << 8;
    hi = p_hi << 8;
  } else {
    lo = ((p_lo << 8) & 0x80008000u) | ((p_lo << 7) & 0x3f803f80u);
    hi = ((p_hi << 8) & 0x80008000u) | ((p_hi << 7) & 0x3f803f80u);
  }
}

// e4m3: the float of code 0x7F / 0xFF under the 2^-8 mapping, +-1.875 (no finite code maps there).
__host__ __device__ __forceinline__ float kv_fp8_nan_fix(float x) {
  return fabsf(x) == 1.875f ? fp8::bits_f32(0x7fc00000u) : x;
}

template <int F, int N>
__device__ __forceinline__ void unpack_fp8(const uint32_t* words, float* out) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    uint32_t lo, hi;
    fp8x4_to_half2_bits<F>(words[i], lo, hi);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    out[4 * i + 0] = a.x, out[4 * i + 1] = a.y, out[4 * i + 2] = b.x, out[4 * i + 3] = b.y;
    if (F == fp8::kE4M3) {
#pragma unroll
      for (int e = 0; e < 4; ++e) out[4 * i + e] = kv_fp8_nan_fix(out[4 * i + e]);
    }
  }
}

// The raw vector's VEC floats (times kv_decode_mul<KV>()).
template <typename KV, int VEC>
__device__ __forceinline__ void kv_unpack(const typename KvRaw<KV, VEC>::type& raw, float* out) {
  if constexpr (std::is_same<KV, fp8_e4m3>::value || std::is_same<KV, fp8_e5m2>::value) {
    constexpr int F = std::is_same<KV, fp8_e4m3>::value ? fp8::kE4M3 : fp8::kE5M2;
    unpack_fp8<F, VEC / 4>(reinterpret_cast<const uint32_t*>(&raw), out);
  } else if constexpr (is_scaled<KV>::value) {
    unpack_vec<decltype(KV::x), VEC>(raw, out);
  } else {
    unpack_vec<KV, VEC>(raw, out);
  }
}

// Streaming load of one raw vector (ptr aligned to its size).
template <typename KV, int VEC>
__device__ __forceinline__ typename KvRaw<KV, VEC>::type kv_load(const KV* ptr) {
  using Raw = typename KvRaw<KV, VEC>::type;
  if constexpr (sizeof(Raw) == 16) {
    return ldg_stream(reinterpret_cast<const uint4*>(ptr));
  } else {
    return ldg_stream_8(reinterpret_cast<const uint2*>(ptr));
  }
}

template <typename KV, int VEC>
__device__ __forceinline__ typename KvRaw<KV, VEC>::type kv_zero() {
  using Raw = typename KvRaw<KV, VEC>::type;
  if constexpr (sizeof(Raw) == 16) {
    return make_uint4(0, 0, 0, 0);
  } else {
    return make_uint2(0, 0);
  }
}

// One element as a float (times kv_decode_mul<KV>()), e.g. a RoPE partner channel.
template <typename KV>
__device__ __forceinline__ float kv_to_float(const KV* ptr) {
  if constexpr (std::is_same<KV, fp8_e4m3>::value || std::is_same<KV, fp8_e5m2>::value) {
    constexpr int F = std::is_same<KV, fp8_e4m3>::value ? fp8::kE4M3 : fp8::kE5M2;
    const uint32_t w = ptr->bits;
    float out[4];
    unpack_fp8<F, 1>(&w, out);
    return out[0];
  } else if constexpr (is_scaled<KV>::value) {
    return to_float<decltype(KV::x)>(ptr->x);
  } else {
    return to_float<KV>(*ptr);
  }
}

// ---- stores (cache_write) ----

template <typename C> struct is_fp8 : std::false_type {};
template <> struct is_fp8<fp8_e4m3> : std::true_type {};
template <> struct is_fp8<fp8_e5m2> : std::true_type {};

// The largest finite value of a float cache type (the clamp of kvmem/ops/_common.py's encode).
template <typename C> __device__ __forceinline__ float kv_max_finite();
template <> __device__ __forceinline__ float kv_max_finite<float>() { return 3.4028234663852886e38f; }
template <> __device__ __forceinline__ float kv_max_finite<__half>() { return 65504.f; }
template <> __device__ __forceinline__ float kv_max_finite<__nv_bfloat16>() { return 3.3895313892515355e38f; }

// x (fp32) as a cache element: float8 by common/fp8.h's encode (clamp to +-max, round to
// nearest even, NaN kept); a float type rounded to nearest even, clamped to +-max first when
// CLAMP (a scaled store: the spec's encode), else as Tensor.to (out of range -> inf).
template <typename C, bool CLAMP>
__device__ __forceinline__ C kv_store_value(float x) {
  if constexpr (std::is_same<C, fp8_e4m3>::value) {
    return C{fp8::encode<fp8::kE4M3>(x)};
  } else if constexpr (std::is_same<C, fp8_e5m2>::value) {
    return C{fp8::encode<fp8::kE5M2>(x)};
  } else {
    if constexpr (CLAMP) {
      const float big = kv_max_finite<C>();
      x = x > big ? big : (x < -big ? -big : x);  // NaN stays NaN
    }
    return from_float<C>(x);
  }
}

}  // namespace kvmem
