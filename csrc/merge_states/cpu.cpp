// Exact merge of two partial attention states over disjoint key sets.
//
// Math, per (token, head) row, in fp32:
//   lse = log(e^lse_a + e^lse_b) = M + log(w_a + w_b),  M = max(lse_a, lse_b), w_x = e^(lse_x - M)
//   out = (w_a * out_a + w_b * out_b) / (w_a + w_b)
// A partial with lse == -inf saw no key: its weight is 0 and its out row is never read (it may
// hold NaN). Both -inf: out = 0, lse = -inf. out / lse may alias out_a / lse_a (or _b): each row
// is read before it is written.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_dtype.h"
#include "common/cpu_math.h"
#include "merge_states/params_from_tensors.h"

namespace kvmem {
namespace cpu {
namespace {

template <typename scalar_t>
void merge_impl(const MergeStatesParams& p) {
  const int64_t T = p.num_tokens, H = p.num_heads, D = p.head_dim;
  using Tp = scalar_t;
  Tp* o = static_cast<Tp*>(p.out);
  const Tp* oa = static_cast<const Tp*>(p.out_a);
  const Tp* ob = static_cast<const Tp*>(p.out_b);
  float* l = p.lse;
  const float* la = p.lse_a;
  const float* lb = p.lse_b;
  const int64_t o_st = p.o_stride_t, o_sh = p.o_stride_h;
  const int64_t oa_st = p.a_stride_t, oa_sh = p.a_stride_h;
  const int64_t ob_st = p.b_stride_t, ob_sh = p.b_stride_h;
  const int64_t l_st = p.lse_stride_t, l_sh = p.lse_stride_h;
  const int64_t la_st = p.la_stride_t, la_sh = p.la_stride_h;
  const int64_t lb_st = p.lb_stride_t, lb_sh = p.lb_stride_h;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D));
  at::parallel_for(0, T * H, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H, h = r % H;
      const float xa = la[t * la_st + h * la_sh], xb = lb[t * lb_st + h * lb_sh];
      const Tp* pa = oa + t * oa_st + h * oa_sh;
      const Tp* pb = ob + t * ob_st + h * ob_sh;
      Tp* po = o + t * o_st + h * o_sh;
      const float M = std::max(xa, xb);
      if (M == kNegInf) {
        fill_zero_row(po, static_cast<int>(D));
        l[t * l_st + h * l_sh] = kNegInf;
        continue;
      }
      const float wa = (xa == kNegInf) ? 0.f : std::exp(xa - M);
      const float wb = (xb == kNegInf) ? 0.f : std::exp(xb - M);
      const float inv = 1.0f / (wa + wb);
      const float ca = wa * inv, cb = wb * inv;
      if (wa == 0.f) {
        for (int64_t d = 0; d < D; ++d) po[d] = from_float<Tp>(to_float(pb[d]) * cb);
      } else if (wb == 0.f) {
        for (int64_t d = 0; d < D; ++d) po[d] = from_float<Tp>(to_float(pa[d]) * ca);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          po[d] = from_float<Tp>(to_float(pa[d]) * ca + to_float(pb[d]) * cb);
        }
      }
      l[t * l_st + h * l_sh] = M + std::log(wa + wb);
    }
  });
}

void merge_states(at::Tensor& out,          // [T, H, D]
                  at::Tensor& lse,          // [T, H] fp32
                  const at::Tensor& out_a,  // [T, H, D]
                  const at::Tensor& lse_a,  // [T, H] fp32
                  const at::Tensor& out_b,  // [T, H, D]
                  const at::Tensor& lse_b   // [T, H] fp32
) {
  constexpr const char* kName = "kvmem_C::merge_states";
  TORCH_CHECK(out.dim() == 3 && out_a.sizes() == out.sizes() && out_b.sizes() == out.sizes(),
              kName, ": out, out_a and out_b must all be [T, H, D]");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == out.size(0) && lse.size(1) == out.size(1) &&
                  lse_a.sizes() == lse.sizes() && lse_b.sizes() == lse.sizes(),
              kName, ": lse, lse_a and lse_b must all be [T, H]");
  TORCH_CHECK(is_kvmem_float_type(out.scalar_type()) && out_a.scalar_type() == out.scalar_type() &&
                  out_b.scalar_type() == out.scalar_type(),
              kName, ": out, out_a and out_b must share a dtype (fp32, bf16 or fp16)");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse_a.scalar_type() == at::kFloat &&
                  lse_b.scalar_type() == at::kFloat,
              kName, ": lse tensors must be fp32");
  TORCH_CHECK(out.device().is_cpu() && lse.device().is_cpu() && out_a.device().is_cpu() &&
                  lse_a.device().is_cpu() && out_b.device().is_cpu() && lse_b.device().is_cpu(),
              kName, ": all tensors must be on the CPU");
  TORCH_CHECK(out.stride(2) == 1 && out_a.stride(2) == 1 && out_b.stride(2) == 1, kName,
              ": the last dim of out, out_a and out_b must have unit stride");
  if (out.size(0) == 0 || out.size(1) == 0) return;
  const MergeStatesParams params = merge_states_params(out, lse, out_a, lse_a, out_b, lse_b);
  KVMEM_DISPATCH_FLOAT_TYPES(out.scalar_type(), kName, [&] { merge_impl<scalar_t>(params); });
}

}  // namespace

}  // namespace cpu
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CPU, m) { m.impl("merge_states", &kvmem::cpu::merge_states); }
