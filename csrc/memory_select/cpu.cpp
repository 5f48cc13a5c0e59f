// Memory-bank block selection on the CPU: score each row's bank blocks by their summaries, then
// a stable top-k per (row, KV head).
//
// Semantics (kvmem/ops/memory_select/reference.py, block_scores + top_k_positions): row b selects
// with one query token t = query_index[b] (default: its segment's first, cu_seqlens_q[b]; -1 or an
// empty segment: nothing). Bank position j < bank_lens[b] (page bank_table[b, j]) scores, for KV
// head h, the group rule over its query heads g: max_g (s_g(j) - logsumexp_j' s_g(j')) with
// s_g(j) = scale * (minmax: sum_d max(q_d * min_d, q_d * max_d); box: sum_d q_d * centre_d +
// |q_d| * radius_d; reps: max(q.k_a, q.k_b); mean: q.centre) (cpu_kernel.inc, fp32; NaN counts as -inf). The
// min(top_k, live) best positions by (-score, position) come out in ascending order, -1 padded.
// Positions >= bank_lens[b] are never read (the table and the summaries of unused pages may hold
// anything); a score that is NaN or -inf is never selected.
//
// Work: pass 1 scores (row, bank tile) items, every query head of a tile at once so that each page's
// [Hkv, 2, D] summaries stream in one contiguous read (a row's bank is cut into tiles when there
// are few rows, e.g. one long row at 128k tokens = 8k blocks, so that every thread scores);
// pass 2 selects per (row, KV head): the group rule into a per-thread row of scores, then
// std::nth_element on the (-score, position) order and an ascending sort of the k winners. Both passes run on at::parallel_for's threads.
//
// Files: this one is the torch glue (checks, parameters), the schedule, the top-k and the CPU
// registration; cpu_kernel.inc the scoring body, compiled once per ISA (baseline, AVX2+FMA,
// AVX-512) by common/cpu_per_isa.h; cpu_kernel.h what both share.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/cpu_dtype.h"
#include "common/cpu_math.h"
#include "memory_select/cpu_kernel.h"
#include "memory_select/params_from_tensors.h"

#define KVMEM_PER_ISA_NS ms
#define KVMEM_PER_ISA_BODY "memory_select/cpu_kernel.inc"
#include "common/cpu_per_isa.h"

namespace kvmem {
namespace cpu {
namespace ms {
namespace {

template <typename Ts>
using TileFn = void (*)(const MemorySelectCpuArgs&, int, int64_t, int64_t, float*);
using GroupRuleFn = void (*)(const float*, int64_t, int, int64_t, float*);

// The token row b selects with, or -1 (no query: nothing selected).
int64_t query_token(const MemorySelectParams& p, int b) {
  int64_t t;
  if (p.query_index != nullptr) {
    t = p.query_index[b];
  } else {
    t = p.cu_seqlens_q[b + 1] > p.cu_seqlens_q[b] ? p.cu_seqlens_q[b] : -1;
  }
  return (t >= 0 && t < p.num_tokens) ? t : -1;
}

// qf[b] = fp32 copy of row b's selecting query token, [Hq, D].
template <typename Tq>
void gather_queries(const MemorySelectParams& p, const std::vector<int64_t>& token, float* qf) {
  const Tq* q = static_cast<const Tq*>(p.q);
  const int64_t row = int64_t(p.num_heads) * p.head_dim;
  for (int b = 0; b < p.batch; ++b) {
    if (token[b] < 0) continue;
    for (int h = 0; h < p.num_heads; ++h) {
      load_row(q + token[b] * p.q_stride_t + h * p.q_stride_h, qf + b * row + int64_t(h) * p.head_dim,
               p.head_dim);
    }
  }
}

// selected[b, h, :] from scores[0:n] (n live positions): the min(k, finite) best by
// (-score, position), ascending, -1 padded. idx: scratch of n entries.
void top_k_row(const float* scores, int64_t n, int k, int32_t* selected, std::vector<int32_t>& idx) {
  idx.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (scores[j] > kNegInf) idx.push_back(static_cast<int32_t>(j));  // NaN and -inf: never selected
  }
  int64_t m = static_cast<int64_t>(idx.size());
  if (m > k) {
    auto better = [scores](int32_t x, int32_t y) {
      return scores[x] > scores[y] || (scores[x] == scores[y] && x < y);
    };
    std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), better);
    std::sort(idx.begin(), idx.begin() + k);
    m = k;
  }  // else: every live position, already ascending
  for (int64_t i = 0; i < m; ++i) selected[i] = idx[i];
  for (int64_t i = m; i < k; ++i) selected[i] = -1;
}

template <typename Ts>
void run_memory_select(MemorySelectCpuArgs& a) {
  const int B = a.batch, Hkv = a.num_kv_heads, Hq = a.num_heads, K = a.top_k;
  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t stride = a.score_stride;
  std::unique_ptr<float[]> scores(new float[std::max<int64_t>(1, int64_t(B) * Hq * stride)]);
  a.scores = scores.get();

  // Pass 1: (row, tile) items. Enough tiles for kItemsPerThread items per thread over all rows,
  // none under kMinTileBlocks blocks.
  int64_t total = 0;
  for (int b = 0; b < B; ++b) total += a.live[b];
  const int64_t want_items = int64_t(nthreads) * kItemsPerThread;
  const int64_t tile = std::max<int64_t>(kMinTileBlocks, (total + want_items - 1) / std::max<int64_t>(1, want_items));
  struct Item {
    int b;
    int64_t j0, j1;
  };
  std::vector<Item> items;
  for (int b = 0; b < B; ++b) {
    for (int64_t j0 = 0; j0 < a.live[b]; j0 += tile) items.push_back({b, j0, std::min(a.live[b], j0 + tile)});
  }
  const TileFn<Ts> fn = KVMEM_PICK_ISA(ms, score_tile<Ts>);
  const MemorySelectCpuArgs& ca = a;
  // A small bank is scored (and selected) on the calling thread: waking the pool costs more.
  const int64_t macs = total * a.num_heads * a.head_dim;
  const int64_t score_grain = macs < kSerialMacs ? static_cast<int64_t>(items.size()) : 1;
  if (!items.empty()) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), score_grain, [&](int64_t i0, int64_t i1) {
      std::unique_ptr<float[]> conv(new float[2 * ca.head_dim]);
      for (int64_t i = i0; i < i1; ++i) fn(ca, items[i].b, items[i].j0, items[i].j1, conv.get());
    });
  }

  // Pass 2: per (row, KV head) the group rule, then the top-k.
  const int G = Hq / Hkv;
  const GroupRuleFn rule = KVMEM_PICK_ISA(ms, group_rule);
  const int64_t select_grain = total * Hq < kSerialSelect ? int64_t(B) * Hkv : 1;
  at::parallel_for(0, int64_t(B) * Hkv, select_grain, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> idx;
    idx.reserve(static_cast<size_t>(stride));
    std::unique_ptr<float[]> agg(new float[std::max<int64_t>(1, stride)]);
    for (int64_t r = r0; r < r1; ++r) {
      const int b = static_cast<int>(r / Hkv), h = static_cast<int>(r % Hkv);
      rule(ca.scores + r * G * stride, stride, G, ca.live[b], agg.get());
      top_k_row(agg.get(), ca.live[b], K, ca.selected + b * ca.sel_stride_b + h * ca.sel_stride_h, idx);
    }
  });
}

}  // namespace
}  // namespace ms

namespace {

void memory_select(at::Tensor& selected,                         // [B, Hkv, top_k] int32
                   const at::Tensor& q,                          // [T, Hq, D]
                   const at::Tensor& summaries,                  // [num_blocks, Hkv, 2, D]
                   const at::Tensor& bank_table,                 // [B, max_bank] int32
                   const at::Tensor& bank_lens,                  // [B] int32
                   const at::Tensor& cu_seqlens_q,               // [B + 1] int32
                   double scale,                                 //
                   const std::optional<at::Tensor>& query_index, // [B] int32
                   c10::string_view summary) {
  constexpr const char* kName = "kvmem_C::memory_select";
  TORCH_CHECK(q.dim() == 3, kName, ": q must be [T, Hq, D]");
  TORCH_CHECK(summaries.dim() == 4 && summaries.size(2) == 2, kName,
              ": summaries must be [num_blocks, Hkv, 2, D]");
  TORCH_CHECK(bank_table.dim() == 2 && bank_table.scalar_type() == at::kInt, kName,
              ": bank_table must be [B, max_bank] int32");
  const int64_t B = bank_table.size(0), Hq = q.size(1), D = q.size(2), Hkv = summaries.size(1);
  TORCH_CHECK(selected.dim() == 3 && selected.size(0) == B && selected.size(1) == Hkv &&
                  selected.scalar_type() == at::kInt,
              kName, ": selected must be [B, Hkv, top_k] int32");
  TORCH_CHECK(is_kvmem_float_type(q.scalar_type()) && is_kvmem_float_type(summaries.scalar_type()),
              kName, ": q and summaries must be fp32, bf16 or fp16");
  TORCH_CHECK(summaries.size(3) == D, kName, ": head dim mismatch between q and summaries");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, kName, ": Hq must be a multiple of Hkv");
  TORCH_CHECK(bank_lens.dim() == 1 && bank_lens.size(0) == B && bank_lens.scalar_type() == at::kInt &&
                  bank_lens.is_contiguous(),
              kName, ": bank_lens must be [B] int32, contiguous");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == B + 1 &&
                  cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.is_contiguous(),
              kName, ": cu_seqlens_q must be [B + 1] int32, contiguous");
  if (query_index.has_value()) {
    TORCH_CHECK(query_index->dim() == 1 && query_index->size(0) == B &&
                    query_index->scalar_type() == at::kInt && query_index->is_contiguous() &&
                    query_index->device().is_cpu(),
                kName, ": query_index must be [B] int32, contiguous, on the CPU");
  }
  TORCH_CHECK(q.device().is_cpu() && summaries.device().is_cpu() && selected.device().is_cpu() &&
                  bank_table.device().is_cpu() && bank_lens.device().is_cpu() &&
                  cu_seqlens_q.device().is_cpu(),
              kName, ": all tensors must be on the CPU");
  TORCH_CHECK(q.stride(2) == 1 && summaries.stride(3) == 1 && selected.stride(2) == 1, kName,
              ": the last dim of q, summaries and selected must have unit stride");
  SummaryKind kind;
  if (summary == "minmax") {
    kind = SummaryKind::kMinMax;
  } else if (summary == "box") {
    kind = SummaryKind::kBox;
  } else if (summary == "reps") {
    kind = SummaryKind::kReps;
  } else if (summary == "mean") {
    kind = SummaryKind::kMean;
  } else {
    TORCH_CHECK(false, kName, ": summary must be 'minmax', 'box', 'reps' or 'mean', got '", std::string(summary),
                "'");
  }
  if (B == 0 || Hkv == 0 || selected.size(2) == 0) return;

  ms::MemorySelectCpuArgs a{};
  static_cast<MemorySelectParams&>(a) = memory_select_params(
      selected, q, summaries, bank_table, bank_lens, cu_seqlens_q, scale, query_index, kind);
  std::vector<int64_t> token(B), live(B);
  int64_t stride = 0;
  for (int b = 0; b < static_cast<int>(B); ++b) {
    token[b] = ms::query_token(a, b);
    const int64_t n = std::min<int64_t>(std::max<int32_t>(a.bank_lens[b], 0), a.max_bank);
    live[b] = (token[b] >= 0 && a.num_blocks > 0 && D > 0) ? n : 0;
    stride = std::max(stride, live[b]);
  }
  std::vector<float> qf(static_cast<size_t>(B * Hq * D));
  KVMEM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kName,
                             [&] { ms::gather_queries<scalar_t>(a, token, qf.data()); });
  a.qf = qf.data();
  a.live = live.data();
  a.score_stride = stride;
  KVMEM_DISPATCH_FLOAT_TYPES(summaries.scalar_type(), kName,
                             [&] { ms::run_memory_select<scalar_t>(a); });
}

}  // namespace

}  // namespace cpu
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CPU, m) { m.impl("memory_select", &kvmem::cpu::memory_select); }
