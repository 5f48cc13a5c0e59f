// The online-softmax state of kvmem's CPU attention kernels, per (query, head) row: m (running
// max of the scores), l (running sum of e^(s - m)) and acc[D] (running sum of e^(s - m) v). This
// header: finishing a row (with an optional attention sink) and merging the split-K partials of a
// row. The per-tile update on vectors is in cpu_online_softmax.inc.
//
//   finished:  out = acc / L,  L = l [+ e^(sink - m)],  lse = m + log L
//              (no key seen, m = -inf: out = 0, lse = -inf, or lse = sink when a sink is given)
//   splits s over disjoint key ranges:  M = max_s m_s,  l = sum_s l_s e^(m_s - M),
//                                       acc = sum_s acc_s e^(m_s - M)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cpu_dtype.h"
#include "common/cpu_math.h"

namespace kvmem {
namespace cpu {

// Write one finished row: out = acc / L, lse = log L (with the sink folded in, see above).
template <typename T>
KVMEM_INLINE void finalize_row(const float* acc, float m, float l, bool has_sink, float sink,
                               int D, T* out_row, float* lse_ptr) {
  float lse_v, mul;
  if (has_sink) {
    const float M = std::max(m, sink);
    const float wm = (m == kNegInf) ? 0.f : std::exp(m - M);
    const float L = l * wm + std::exp(sink - M);
    lse_v = M + std::log(L);
    mul = wm / L;
  } else {
    lse_v = (m == kNegInf) ? kNegInf : m + std::log(l);
    mul = (m == kNegInf) ? 0.f : 1.0f / l;
  }
  if (mul == 0.f) {
    fill_zero_row(out_row, D);  // no (weighted) key: never read acc
  } else {
    store_row_scaled(acc, out_row, D, mul);
  }
  if (lse_ptr) *lse_ptr = lse_v;
}

// Split-K partial records, one per split of a work item: [rows, D] acc, then [rows] m, [rows] l.
KVMEM_INLINE int64_t split_record_floats(int rows, int D) { return int64_t(rows) * (D + 2); }

// Merge row r of the nsplit consecutive records starting at `records` into (acc, *m, *l): the
// state of the row over the union of the splits' keys. acc (D floats) is only written when some
// split saw a key (*m > -inf); a split that saw none is skipped, its acc never read.
KVMEM_INLINE void merge_split_row(const float* records, int nsplit, int rows, int r, int D,
                                  float* KVMEM_RESTRICT acc, float* m, float* l) {
  const int64_t rec_size = split_record_floats(rows, D);
  float M = kNegInf;
  for (int s = 0; s < nsplit; ++s) {
    const float* rec = records + s * rec_size;
    M = std::max(M, rec[int64_t(rows) * D + r]);
  }
  float lsum = 0.f;
  if (M != kNegInf) {
    std::fill(acc, acc + D, 0.f);
    for (int s = 0; s < nsplit; ++s) {
      const float* rec = records + s * rec_size;
      const float ms = rec[int64_t(rows) * D + r];
      if (ms == kNegInf) continue;  // this split saw no key of the row: skip, never read acc
      const float w = std::exp(ms - M);
      lsum += rec[int64_t(rows) * D + rows + r] * w;
      const float* KVMEM_RESTRICT ra = rec + int64_t(r) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += ra[d] * w;
    }
  }
  *m = M;
  *l = lsum;
}

// Store the state of `rows` rows as one split record (the layout merge_split_row reads).
KVMEM_INLINE void store_split_record(const float* acc, const float* m, const float* l, int rows,
                                     int D, float* rec) {
  std::copy(acc, acc + int64_t(rows) * D, rec);
  std::copy(m, m + rows, rec + int64_t(rows) * D);
  std::copy(l, l + rows, rec + int64_t(rows) * D + rows);
}

}  // namespace cpu
}  // namespace kvmem
