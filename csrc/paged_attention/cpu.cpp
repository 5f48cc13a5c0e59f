// Paged attention on the CPU: a FlashAttention-style tiled online softmax in fp32.
//
// Math (the spec is kvmem/ops/reference.py). For query i of sequence b at position
// p = seq_lens[b] - q_len_b + i and query head h (KV head h / G, G = Hq / Hkv):
//   s_j   = scale * q.k_j;  with softcap c: s_j = c * tanh(s_j / c)
//   (RoPE on load: k_j rotated at position j first, in fp32: (x, y) -> (x cos - y sin,
//   y cos + x sin) on the pairs (i, i + rot/2) or (2i, 2i + 1), cos/sin from rope_cos_sin[j])
//   key j visible iff j < seq_lens[b], (causal => j <= p), (window W > 0 => j > p - W)
//   out   = sum_j exp(s_j) v_j / L,   L = sum_j exp(s_j) [+ exp(sink_h)],   lse = log L
//   (nothing visible: out = 0, lse = -inf; or lse = sink_h if a sink is given and the sequence
//   has keys at all, exactly like the reference.)
// Online softmax per (query, head) row, over key tiles: m' = max(m, max_j s_j),
//   l' = l * e^(m - m') + sum_j e^(s_j - m'),   acc' = acc * e^(m - m') + sum_j e^(s_j - m') v_j.
// Split-K partials (m, l, acc) over disjoint key ranges merge exactly:
//   M = max_s m_s,  l = sum_s l_s e^(m_s - M),  acc = sum_s acc_s e^(m_s - M).
//
// Work decomposition: a work item is (sequence b, query tile, block of KV heads, key range). Its
// rows are the (query, query head) pairs of the tile's queries and of the G query heads of each KV
// head, so every K/V row is read (and converted to fp32) once per query tile. Decode-like tiles
// (few rows per KV head) take several KV heads at once, so that they stream whole [Hkv, D] token
// rows of each page. Key tiles of kKeyTile keys are independent of the page size. Items whose key
// range is long relative to the machine's parallelism are split along keys (flash-decoding), each
// split writing an (m, l, acc) partial that a second pass merges. Items are scheduled dynamically
// (largest first) over at::parallel_for's threads.
//
// Memory safety: only keys in [lo, seq_len) are ever touched (lo = the first key any query of the
// sequence can see), so block-table entries outside that range are never read; masked keys are
// skipped by range (never multiplied by zero), so NaN in unused cache slots cannot leak.
//
// Files: this one is the torch glue (checks, parameters), the schedule and the CPU registration;
// cpu_kernel.inc the kernel body, compiled once per ISA (baseline, AVX2+FMA, AVX-512) by
// common/cpu_per_isa.h, cpu_isa() picking one at runtime; cpu_kernel.h what both share. The
// primitives (vector math, online softmax, split-K planning) are in csrc/common/.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/cpu_dtype.h"
#include "common/cpu_math.h"
#include "common/cpu_prefetch.h"
#include "common/cpu_rope.h"
#include "common/cpu_softmax.h"
#include "common/cpu_split_k.h"
#include "paged_attention/cpu_kernel.h"
#include "paged_attention/params_from_tensors.h"

#define KVMEM_PER_ISA_NS pa
#define KVMEM_PER_ISA_BODY "paged_attention/cpu_kernel.inc"
#include "common/cpu_per_isa.h"

namespace kvmem {
namespace cpu {
namespace pa {
namespace {

template <typename T>
using ItemFn = void (*)(const PagedAttentionCpuArgs&, const WorkItem&, Scratch&);

// Merge the split partials of one item shape and write its rows (second pass).
template <typename T>
void merge_group(const PagedAttentionCpuArgs& a, const SplitGroup& sg, float* tmp) {
  const SeqInfo& sq = a.seqs[sg.b];
  const int G = a.group, D = a.head_dim;
  const int rph = (sg.i1 - sg.i0) * G;
  const int rows = (sg.h1 - sg.h0) * rph;
  const bool has_sink = a.sink_logits != nullptr;
  for (int r = 0; r < rows; ++r) {
    float M, l;
    merge_split_row(a.partial + sg.part, sg.nsplit, rows, r, D, tmp, &M, &l);
    const int hh = r / rph, qi = (r % rph) / G, g = r % G;
    const int64_t t = sq.q_start + sg.i0 + qi;
    const int h = (sg.h0 + hh) * G + g;
    const float sink = has_sink ? a.sink_logits[h * a.sink_stride] : 0.f;
    finalize_row(tmp, M, l, has_sink, sink, D,
                 static_cast<T*>(a.out) + t * a.o_stride_t + h * a.o_stride_h,
                 a.lse ? a.lse + t * a.lse_stride_t + h * a.lse_stride_h : nullptr);
  }
}

template <typename T>
void zero_token_rows(const PagedAttentionCpuArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < a.num_heads; ++h) {
      fill_zero_row(static_cast<T*>(a.out) + t * a.o_stride_t + h * a.o_stride_h, a.head_dim);
      if (a.lse) a.lse[t * a.lse_stride_t + h * a.lse_stride_h] = kNegInf;
    }
  }
}

// Work groups: (sequence, query tile, block of KV heads), with their key range. A query tile with
// few rows per KV head (decode) takes several KV heads at once, so that it streams whole
// [Hkv, D] token rows of each page.
std::vector<WorkGroup> work_groups(const PagedAttentionCpuArgs& a, const std::vector<SeqInfo>& seqs) {
  const int G = a.group;
  const int qtile = std::max(1, kRowsPerTile / G);
  std::vector<WorkGroup> groups;
  for (int32_t b = 0; b < static_cast<int32_t>(seqs.size()); ++b) {
    const SeqInfo& s = seqs[b];
    if (s.q_len <= 0 || s.hi <= s.lo) continue;
    for (int64_t i0 = 0; i0 < s.q_len; i0 += qtile) {
      const int64_t i1 = std::min<int64_t>(s.q_len, i0 + qtile);
      const int64_t p0 = s.first_pos + i0, p1 = s.first_pos + i1 - 1;
      int64_t ka = s.lo, kb = s.hi;
      if (a.window > 0) ka = std::max(ka, p0 - a.window + 1);
      if (a.causal) kb = std::min(kb, p1 + 1);
      if (kb < ka) kb = ka;
      const int rph = static_cast<int>(i1 - i0) * G;
      const int per_block = std::max(1, std::min(a.num_kv_heads, kRowsPerTile / rph));
      const int nblocks = (a.num_kv_heads + per_block - 1) / per_block;
      for (int hb = 0; hb < nblocks; ++hb) {  // near-equal blocks
        const int h0 = static_cast<int>(int64_t(a.num_kv_heads) * hb / nblocks);
        const int h1 = static_cast<int>(int64_t(a.num_kv_heads) * (hb + 1) / nblocks);
        groups.push_back({b, h0, h1, static_cast<int32_t>(i0), static_cast<int32_t>(i1), ka, kb});
      }
    }
  }
  return groups;
}

template <typename T, typename C>
void run_paged_attention(PagedAttentionCpuArgs& a, const std::vector<SeqInfo>& seqs) {
  const int64_t num_tokens = a.num_tokens;
  const int nthreads = std::max(1, at::get_num_threads());

  // Tokens outside every sequence, and sequences without keys: out = 0, lse = -inf.
  int64_t covered_lo = num_tokens, covered_hi = 0;
  for (const SeqInfo& s : seqs) {
    if (s.q_len <= 0) continue;
    covered_lo = std::min(covered_lo, s.q_start);
    covered_hi = std::max(covered_hi, s.q_start + s.q_len);
    if (s.hi <= s.lo) zero_token_rows<T>(a, s.q_start, s.q_start + s.q_len);
  }
  if (covered_lo >= covered_hi) {
    zero_token_rows<T>(a, 0, num_tokens);
  } else {
    zero_token_rows<T>(a, 0, covered_lo);
    zero_token_rows<T>(a, covered_hi, num_tokens);
  }

  const std::vector<WorkGroup> groups = work_groups(a, seqs);
  if (groups.empty()) return;
  const SplitKPlan plan =
      plan_split_k(groups, a.group, a.head_dim, nthreads, kKeyTile, kMinSplitKeys);
  std::unique_ptr<float[]> partial;
  if (plan.partial_floats > 0) {
    partial.reset(new float[plan.partial_floats]);
    a.partial = partial.get();
  }

  const ItemFn<T> fn = a.rot_dim > 0 ? KVMEM_PICK_ISA(pa, process_item<C KVMEM_COMMA true>)
                                      : KVMEM_PICK_ISA(pa, process_item<C KVMEM_COMMA false>);
  const PagedAttentionCpuArgs& ca = a;
  const int D = a.head_dim;
  run_work_items(
      plan.items, nthreads, [&] { return Scratch(plan.max_rows, plan.max_queries, D); },
      [&](const WorkItem& it, Scratch& sc) { fn(ca, it, sc); });

  if (!plan.split_groups.empty()) {
    const auto& sgs = plan.split_groups;
    at::parallel_for(0, static_cast<int64_t>(sgs.size()), 1, [&](int64_t g0, int64_t g1) {
      std::unique_ptr<float[]> tmp(new float[D]);
      for (int64_t g = g0; g < g1; ++g) merge_group<T>(ca, sgs[g], tmp.get());
    });
  }
}

}  // namespace
}  // namespace pa

namespace {

void paged_attention(at::Tensor& out,                              // [T, Hq, D]
                     const std::optional<at::Tensor>& lse,         // [T, Hq] fp32
                     const at::Tensor& q,                          // [T, Hq, D]
                     const at::Tensor& k_cache,                    // [num_blocks, block_size, Hkv, D]
                     const at::Tensor& v_cache,                    // [num_blocks, block_size, Hkv, D]
                     const at::Tensor& block_table,                // [B, max_blocks] int32
                     const at::Tensor& seq_lens,                   // [B] int32
                     const at::Tensor& cu_seqlens_q,               // [B + 1] int32
                     int64_t max_seqlen_q, int64_t max_seqlen_k,   // host upper bounds
                     double scale, bool causal, int64_t window, double softcap,
                     const std::optional<at::Tensor>& sink_logits,  // [Hq] fp32
                     const std::optional<at::Tensor>& k_scale,      // 0-d or [Hkv] fp32
                     const std::optional<at::Tensor>& v_scale,      // 0-d or [Hkv] fp32
                     const std::optional<at::Tensor>& rope_cos_sin, // [num_positions, rot_dim] fp32
                     bool rope_neox
) {
  constexpr const char* kName = "kvmem_C::paged_attention";
  TORCH_CHECK(q.dim() == 3, kName, ": q must be [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, kName,
              ": caches must be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(out.dim() == 3 && out.sizes() == q.sizes(), kName, ": out must have q's shape");
  TORCH_CHECK(is_kvmem_float_type(q.scalar_type()), kName, ": q must be fp32, bf16 or fp16");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), kName, ": out must have q's dtype");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && is_kvmem_cache_type(k_cache.scalar_type()),
              kName, ": k_cache and v_cache must share a dtype (float32, bfloat16, float16, float8_e4m3fn or float8_e5m2)");
  const bool fp8_cache = k_cache.scalar_type() == at::kFloat8_e4m3fn || k_cache.scalar_type() == at::kFloat8_e5m2;
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), kName, ": k_scale and v_scale go together");
  TORCH_CHECK(!fp8_cache || k_scale.has_value(), kName, ": float8 caches need k_scale and v_scale");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), kName, ": k_cache and v_cache shapes differ");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  out.device().is_cpu() && block_table.device().is_cpu() &&
                  seq_lens.device().is_cpu() && cu_seqlens_q.device().is_cpu(),
              kName, ": all tensors must be on the CPU");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, kName, ": head dim mismatch between q and the caches");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, kName, ": Hq must be a multiple of Hkv");
  TORCH_CHECK(D > 0 && BS > 0, kName, ": empty head dim or block size");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              kName, ": the last dim of q, out and the caches must have unit stride");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt, kName,
              ": block_table must be [B, max_blocks] int32");
  const int64_t B = block_table.size(0);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.scalar_type() == at::kInt,
              kName, ": seq_lens must be [B] int32");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == B + 1 &&
                  cu_seqlens_q.scalar_type() == at::kInt,
              kName, ": cu_seqlens_q must be [B + 1] int32");
  if (lse.has_value()) {
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == T && lse->size(1) == Hq &&
                    lse->scalar_type() == at::kFloat && lse->device().is_cpu(),
                kName, ": lse must be [T, Hq] fp32 on the CPU");
  }
  if (sink_logits.has_value()) {
    TORCH_CHECK(sink_logits->dim() == 1 && sink_logits->size(0) == Hq &&
                    sink_logits->scalar_type() == at::kFloat && sink_logits->device().is_cpu(),
                kName, ": sink_logits must be [Hq] fp32 on the CPU");
  }
  for (const auto* sc : {&k_scale, &v_scale}) {
    if (!sc->has_value()) continue;
    const at::Tensor& t = **sc;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() &&
                    (t.dim() == 0 || (t.dim() == 1 && t.size(0) == Hkv)),
                kName, ": k_scale / v_scale must be 0-d or [Hkv] fp32 on the CPU");
  }
  if (rope_cos_sin.has_value()) {
    const at::Tensor& cs = *rope_cos_sin;
    TORCH_CHECK(cs.dim() == 2 && cs.scalar_type() == at::kFloat && cs.device().is_cpu() &&
                    cs.stride(1) == 1,
                kName, ": rope_cos_sin must be [num_positions, rot_dim] fp32 on the CPU, unit stride");
    TORCH_CHECK(cs.size(1) > 0 && cs.size(1) % 2 == 0 && cs.size(1) <= D, kName,
                ": rope_cos_sin's rot_dim must be even, positive and <= head_dim");
    TORCH_CHECK(cs.size(0) >= max_seqlen_k, kName, ": rope_cos_sin needs a row per key position (",
                cs.size(0), " < max_seqlen_k ", max_seqlen_k, ")");
  }
  if (T == 0 || Hq == 0) return;

  PagedAttentionParams params =
      paged_attention_params(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                             max_seqlen_q, max_seqlen_k, scale, causal, window, softcap,
                             sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox);

  // Sequence metadata (O(B) host reads; values are validated by the Python layer).
  std::vector<pa::SeqInfo> seqs(B);
  for (int64_t b = 0; b < B; ++b) {
    pa::SeqInfo& s = seqs[b];
    s.q_start = params.cu_seqlens_q[b * params.cu_seqlens_stride];
    s.q_len = int64_t(params.cu_seqlens_q[(b + 1) * params.cu_seqlens_stride]) - s.q_start;
    s.kv_len = params.seq_lens[b * params.seq_lens_stride];
    s.first_pos = s.kv_len - s.q_len;
    s.lo = params.window > 0 ? std::max<int64_t>(0, s.first_pos - params.window + 1) : 0;
    s.hi = s.kv_len;
  }

  pa::PagedAttentionCpuArgs a{};
  static_cast<PagedAttentionParams&>(a) = params;
  a.seqs = seqs.data();
  a.partial = nullptr;
  a.qscale = static_cast<float>(softcap > 0 ? scale / softcap : scale);
  a.q_dtype = q.scalar_type() == at::kFloat      ? pa::QDtype::kFloat
              : q.scalar_type() == at::kBFloat16 ? pa::QDtype::kBFloat16
                                                 : pa::QDtype::kHalf;
  KVMEM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kName, [&] {
    KVMEM_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), kName,
                               [&] { pa::run_paged_attention<scalar_t, cache_t>(a, seqs); });
  });
}

}  // namespace

}  // namespace cpu
}  // namespace kvmem

TORCH_LIBRARY_IMPL(kvmem_C, CPU, m) { m.impl("paged_attention", &kvmem::cpu::paged_attention); }
