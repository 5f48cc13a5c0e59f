// Host-side helpers for the CUDA glue of kvmem's ops (csrc/<op>/cuda.cu): dtype dispatch, the
// current stream, per-device caches of device queries, alignment checks.
#pragma once

// Only c10/cuda headers (no ATen/cuda/CUDAContext.h): they need no cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>

namespace kvmem {
namespace cuda {

// Calls fn(T{}) with T the CUDA element type of `dtype` (fp16, bf16; fp32 when with_fp32).
template <typename Fn>
void dispatch_half_types(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::ScalarType::Half: fn(__half{}); break;
    case at::ScalarType::BFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, name, ": CUDA kernels are built for fp16 and bf16, got ", dtype);
  }
}

template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* name, Fn&& fn) {
  if (dtype == at::ScalarType::Float) {
    fn(float{});
  } else {
    dispatch_half_types(dtype, name, fn);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kMaxDevices = 64;

// query() for the current device, cached in cache[device] (a static std::atomic<int>[kMaxDevices],
// zero = not yet known). Benign race: concurrent first calls store the same value.
template <typename Query>
inline int cached_per_device(std::atomic<int>* cache, Query&& query) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int n = query();
  if (dev < kMaxDevices && n > 0) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Number of SMs of the current device (cached per device).
inline int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_per_device(cache, [] {
    int dev = 0, n = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  });
}

inline bool aligned_16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if ((t.stride(i) * t.element_size()) % 16 != 0) return false;
  return t.stride(-1) == 1;
}

}  // namespace cuda
}  // namespace kvmem
