// Online-softmax pieces shared by kvmem's CUDA attention kernels (device code only, no torch
// headers): merging two (m, l) states in base 2, folding an attention sink into a finished row,
// and the exact combine of split-K partials (out_s, lse_s) in natural log.
//
//   merge (base 2):  m = max(m1, m2),  l = l1 2^(m1 - m) + l2 2^(m2 - m)  (acc alike)
//   splits:          lse = log(sum_s e^lse_s [+ e^sink]),  out = sum_s e^(lse_s - lse) out_s
//   (a state or split with m = -inf / lse = -inf saw no key: weight 0, its values never read)
#pragma once

#include <math.h>
#include <stdint.h>

namespace kvmem {

// Weights that merge a base-2 state with max m into one with max mo: the merged max is
// mn = max(m, mo), and l = l * a + lo * c (acc alike). Both 0 when neither saw a key.
__device__ __forceinline__ void merge_state_weights(float m, float mo, float& mn, float& a, float& c) {
  mn = fmaxf(m, mo);
  a = mn == -INFINITY ? 0.f : exp2f(m - mn);
  c = mn == -INFINITY ? 0.f : exp2f(mo - mn);
}

// A finished row (out o, natural-log lse) with the sink logit folded in: lse' = log(e^lse +
// e^sink), o' = o e^(lse - lse') (0 when the row saw no key).
__device__ __forceinline__ void fold_sink(float sink, float& lse, float& o) {
  const float tot = lse == -INFINITY ? sink : fmaxf(lse, sink) + log1pf(expf(-fabsf(lse - sink)));
  o *= lse == -INFINITY ? 0.f : expf(lse - tot);
  lse = tot;
}

// Combine num_splits partials of one row: lse_s = partial_lse[s], element d of out_s =
// partial_out[s * D + d] (read only when d < D); sink: a logit, or nullptr. Returns the row's
// lse; *o = element d of the combined out (0 when no key and no sink).
__device__ __forceinline__ float combine_splits(const float* partial_lse, const float* partial_out,
                                                int num_splits, int D, int d, const float* sink,
                                                float* o) {
  float mx = sink != nullptr ? *sink : -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, partial_lse[s]);
  float total = 0.f, acc = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float ls = partial_lse[s];
      if (ls == -INFINITY) continue;  // empty split: its out is 0, never read
      const float w = expf(ls - mx);
      total += w;
      if (d < D) acc += w * partial_out[s * D + d];
    }
    if (sink != nullptr) total += expf(*sink - mx);
  }
  *o = total > 0.f ? acc / total : 0.f;
  return total > 0.f ? mx + logf(total) : -INFINITY;
}

}  // namespace kvmem
