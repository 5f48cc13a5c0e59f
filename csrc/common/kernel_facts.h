// Facts about what kvmem's compiled kernels accept, as build_info() reports them to Python
// (kvmem/dispatch reads them; they are not restated there). No torch or CUDA headers: included by
// torch_bindings.cpp and by the dispatchers these names describe.
#pragma once

namespace kvmem {

// KVMEM_DISPATCH_FLOAT_TYPES (cpu_dtype.h) and cuda::dispatch_float_types (cuda_glue.h).
inline constexpr const char* kFloatDtypeNames[] = {"float32", "bfloat16", "float16"};
// The cache dtypes the CPU cache_write / paged_attention kernels take, with any of the float
// dtypes above (KVMEM_DISPATCH_CACHE_TYPES, cpu_dtype.h; the float8 ones need scales).
inline constexpr const char* kCacheDtypeNames[] = {"float32", "bfloat16", "float16", "float8_e4m3fn",
                                                   "float8_e5m2"};
// cuda::dispatch_half_types (cuda_glue.h).
inline constexpr const char* kHalfDtypeNames[] = {"float16", "bfloat16"};
// The cache dtypes the CUDA kernels take, with any of their dtypes. cache_write (cache_write/cuda.cu,
// dispatch_cache_types; any of kFloatDtypeNames): every float cache, float8 ones with scales.
inline constexpr const char* kCudaCacheWriteCacheDtypeNames[] = {"float32", "bfloat16", "float16",
                                                                 "float8_e4m3fn", "float8_e5m2"};
// paged_attention's decode kernels (paged_attention/cuda.cu launch_for_cache; q of kHalfDtypeNames):
// both 16-bit floats and float8 (with scales); fp32 caches are not built (another backend takes
// them).
inline constexpr const char* kCudaPagedAttentionCacheDtypeNames[] = {"float16", "bfloat16", "float8_e4m3fn",
                                                                     "float8_e5m2"};

// The largest head dim build_info() reports for every kernel (the CPU kernels size their scratch
// at run time; the CUDA decode kernel's list is in paged_attention/capabilities.h).
inline constexpr int kMaxHeadDim = 256;

}  // namespace kvmem
