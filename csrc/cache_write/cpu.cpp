// Scatter this step's keys/values into the paged caches.
//
// Math: for token t with slot = slot_mapping[t] >= 0 (slot = block * block_size + offset):
//   k_cache[slot / block_size, slot % block_size, :, :] = k[t]   (same for v);
// slot == -1 (any negative slot) marks a padding token, which is skipped. With scales
// (k_scale / v_scale, 0-d or per KV head) the row stored is encode(k / scale): kvmem's one
// encoding (kvmem/ops/_common.py): fp32 division, clamp to +- the cache format's largest finite
// value, round to nearest even (common/fp8.h for the float8 caches). Each (token, head) row is a
// contiguous copy (memcpy when the dtypes match and there is no scale, an fp32 round trip
// otherwise); tokens are spread over threads with at::parallel_for.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cache_write/params_from_tensors.h"
#include "common/cpu_dtype.h"

namespace kvmem {
namespace cpu {
namespace {

template <typename Src, typename Dst>
KVMEM_INLINE void copy_row(const Src* KVMEM_RESTRICT src, Dst* KVMEM_RESTRICT dst, int64_t n) {
  if constexpr (std::is_same_v<Src, Dst>) {
    std::memcpy(dst, src, sizeof(Dst) * n);
  } else {
    static_assert(!is_fp8_v<Dst>, "float8 caches are written with scales");
    for (int64_t i = 0; i < n; ++i) dst[i] = from_float<Dst>(to_float(src[i]));
  }
}

// dst = encode(src / scale): the division in fp32, as the reference.
template <typename Src, typename Dst>
KVMEM_INLINE void encode_row(const Src* KVMEM_RESTRICT src, Dst* KVMEM_RESTRICT dst, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = encode_clamped<Dst>(to_float(src[i]) / scale);
}

template <typename Src, typename Dst>
void cache_write_impl(const CacheWriteParams& p) {
  const int64_t T = p.num_tokens, H = p.num_kv_heads, D = p.head_dim;
  const int64_t BS = p.block_size;
  const Src* kp = static_cast<const Src*>(p.k);
  const Src* vp = static_cast<const Src*>(p.v);
  Dst* kc = static_cast<Dst*>(p.k_cache);
  Dst* vc = static_cast<Dst*>(p.v_cache);
  const int64_t* slots = p.slot_mapping;
  const int64_t ss = p.slot_stride;
  const int64_t k_st = p.k_stride_t, k_sh = p.k_stride_h, v_st = p.v_stride_t, v_sh = p.v_stride_h;
  const int64_t kc_sb = p.kc_stride_b, kc_ss = p.kc_stride_s, kc_sh = p.kc_stride_h;
  const int64_t vc_sb = p.vc_stride_b, vc_ss = p.vc_stride_s, vc_sh = p.vc_stride_h;
  // ~16 KiB of copies per task at least.
  const int64_t row_bytes = 2 * H * D * int64_t(sizeof(Dst));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t slot = slots[t * ss];
      if (slot < 0) continue;
      const int64_t blk = slot / BS, off = slot % BS;
      Dst* kd = kc + blk * kc_sb + off * kc_ss;
      Dst* vd = vc + blk * vc_sb + off * vc_ss;
      const Src* ks = kp + t * k_st;
      const Src* vs = vp + t * v_st;
      if (p.k_scale != nullptr) {
        for (int64_t h = 0; h < H; ++h) {
          encode_row(ks + h * k_sh, kd + h * kc_sh, D, p.k_scale[h * p.k_scale_stride]);
          encode_row(vs + h * v_sh, vd + h * vc_sh, D, p.v_scale[h * p.v_scale_stride]);
        }
      } else if constexpr (!is_fp8_v<Dst>) {
        for (int64_t h = 0; h < H; ++h) {
          copy_row(ks + h * k_sh, kd + h * kc_sh, D);
          copy_row(vs + h * v_sh, vd + h * vc_sh, D);
        }
      }
    }
  });
}

void cache_write(const at::Tensor& k,            // [T, Hkv, D]
                 const at::Tensor& v,            // [T, Hkv, D]
                 at::Tensor& k_cache,            // [num_blocks, block_size, Hkv, D]
                 at::Tensor& v_cache,            // [num_blocks, block_size, Hkv, D]
                 const at::Tensor& slot_mapping,  // [T] int64
                 const std::optional<at::Tensor>& k_scale,  // 0-d or [Hkv] fp32
                 const std::optional<at::Tensor>& v_scale   // 0-d or [Hkv] fp32
) {
  constexpr const char* kName = "kvmem_C::cache_write";
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(), kName,
              ": k and v must both be [T, Hkv, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              kName, ": caches must both be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), kName,
              ": k/v [T, Hkv, D] do not match the caches' [.., .., Hkv, D]");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) &&
                  slot_mapping.scalar_type() == at::kLong,
              kName, ": slot_mapping must be [T] int64");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && is_kvmem_float_type(k.scalar_type()), kName,
              ": k and v must share a dtype (fp32, bf16 or fp16)");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  is_kvmem_cache_type(k_cache.scalar_type()),
              kName, ": k_cache and v_cache must share a dtype (fp32, bf16, fp16, float8_e4m3fn or float8_e5m2)");
  const bool fp8_cache = k_cache.scalar_type() == at::kFloat8_e4m3fn || k_cache.scalar_type() == at::kFloat8_e5m2;
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), kName, ": k_scale and v_scale go together");
  TORCH_CHECK(!fp8_cache || k_scale.has_value(), kName, ": float8 caches need k_scale and v_scale");
  for (const auto* sc : {&k_scale, &v_scale}) {
    if (!sc->has_value()) continue;
    const at::Tensor& t = **sc;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() &&
                    (t.dim() == 0 || (t.dim() == 1 && t.size(0) == k.size(1))),
                kName, ": k_scale / v_scale must be 0-d or [Hkv] fp32 on the CPU");
  }
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu() && slot_mapping.device().is_cpu(),
              kName, ": all tensors must be on the CPU");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              kName, ": the last dim of k, v and the caches must have unit stride");
  if (k.size(0) == 0 || k.size(1) == 0 || k.size(2) == 0) return;
  const CacheWriteParams params = cache_write_params(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  KVMEM_DISPATCH_FLOAT_TYPES(k.scalar_type(), kName, [&] {
    KVMEM_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), kName, [&] {
      cache_write_impl<scalar_t, cache_t>(params);
    });
  });
}

}  // namespace

}  // namespace cpu
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CPU, m) { m.impl("cache_write", &kvmem::cpu::cache_write); }
