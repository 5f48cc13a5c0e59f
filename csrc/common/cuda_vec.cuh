// 16-byte vector loads and fp16/bf16/fp32 <-> fp32 conversions for kvmem's CUDA kernels (device
// code only, no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kvmem {

// Read-only, streaming 16-byte load: K/V rows are read once per CTA, keep them out of L1.
__device__ __forceinline__ uint4 ldg_stream(const uint4* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

// The same for 8 bytes (float8 cache vectors).
__device__ __forceinline__ uint2 ldg_stream_8(const uint2* ptr) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(ptr));
  return r;
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Unpack the VEC = 16 / sizeof(T) elements of a 16-byte vector into floats.
template <typename T, int VEC>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float* out) {
  static_assert(VEC * sizeof(T) == 16, "a vector is 16 bytes");
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(e[i]);
}

// Load 16 bytes (ptr must be 16-byte aligned) and unpack them.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* ptr, float* out) {
  unpack_vec<T, VEC>(*reinterpret_cast<const uint4*>(ptr), out);
}

}  // namespace kvmem
