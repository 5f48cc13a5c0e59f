// Paged attention on the CPU: a FlashAttention-style tiled online softmax in fp32.
//
// Math (the spec is kvmem/ops/reference.py). For query i of sequence b at position
// p = seq_lens[b] - q_len_b + i and query head h (KV head h / G, G = Hq / Hkv):
//   s_j   = scale * q.k_j;  with softcap c: s_j = c * tanh(s_j / c)
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
// ISA: the kernel section of this file (between the KVMEM_PA_KERNEL_PASS markers) is compiled
// three times, by including this very file into three namespaces: for the baseline ISA, and on
// x86 under `#pragma GCC target` for AVX2+FMA and for AVX-512. cpu_isa() picks one at runtime.
// The kernels are plain C++ (fixed-width inner loops, GCC/Clang vector extensions for the
// horizontal sums), auto-vectorised for each target.

#ifndef KVMEM_PA_KERNEL_PASS
// =============================================================================================
// Part 1: shared definitions
// =============================================================================================
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cpu_utils.h"

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define KVMEM_HAVE_SHUFFLEVECTOR 1
#else
#define KVMEM_HAVE_SHUFFLEVECTOR 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define KVMEM_NOINLINE __attribute__((noinline))
#else
#define KVMEM_NOINLINE
#endif

namespace kvmem {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

static Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if KVMEM_X86_MULTIVERSION
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2) best = Isa::kAvx2;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = Isa::kAvx512;
  }
#endif
  if (const char* env = std::getenv("KVMEM_CPU_ISA")) {
    const std::string s(env);
    Isa cap = best;
    if (s == "baseline" || s == "default" || s == "none") cap = Isa::kBaseline;
    else if (s == "avx2") cap = Isa::kAvx2;
    else if (s == "avx512") cap = Isa::kAvx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

namespace pa {

constexpr int kKeyTile = 32;            // keys per tile (independent of the page size)
constexpr int kRowsPerTile = 64;        // target (query, head) rows per work item
constexpr int64_t kMinSplitKeys = 256;  // never split a key range into chunks smaller than this
constexpr int kInPlaceMaxRows = 8;      // bf16/fp16 K/V converted on the fly up to this many rows
constexpr int kWideMinRows = 16;        // from this many rows per KV head: the GEMM-style path

template <int N>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * N)));
};

struct SeqInfo {
  int64_t q_start, q_len, kv_len, first_pos, lo, hi;  // visible keys of the sequence: [lo, hi)
};

// One unit of work: the rows of sequence b, KV heads [h0, h1) and queries [i0, i1), over keys
// [k0, k1). Row r = ((h - h0) * nq + qi) * G + g  (query head h * G + g, query i0 + qi).
struct Item {
  int32_t b, h0, h1, i0, i1;
  int64_t k0, k1;
  int64_t part;  // -1: finalise into out/lse; else float offset of this split's partial record
  int64_t cost;
};

// An item shape whose key range was split: its partials are merged in a second pass.
struct SplitGroup {
  int32_t b, h0, h1, i0, i1;
  int64_t part;  // offset of the first split's record; the nsplit records are consecutive
  int32_t nsplit;
};

template <typename T>
struct Args {
  const T* q;  // [T, Hq, D]
  int64_t q_st, q_sh;
  const T* kc;  // [num_blocks, block_size, Hkv, D]
  int64_t k_sb, k_ss, k_sh;
  const T* vc;  // [num_blocks, block_size, Hkv, D]
  int64_t v_sb, v_ss, v_sh;
  const int32_t* bt;  // [B, max_blocks]
  int64_t bt_sb, bt_sm;
  T* out;  // [T, Hq, D]
  int64_t o_st, o_sh;
  float* lse;  // [T, Hq] or null
  int64_t l_st, l_sh;
  const float* sink;  // [Hq] or null
  int64_t sink_s;
  float* partial;  // split records: [rows, D] acc, [rows] m, [rows] l
  const SeqInfo* seqs;
  int Hq, Hkv, G, D, BS;
  float qscale;   // scale, or scale / softcap
  float softcap;  // <= 0: none
  bool causal;
  int64_t window;  // <= 0: none
};

// Per-thread scratch, sized for the largest item.
struct Scratch {
  std::unique_ptr<float[]> buf;
  float* Q;    // [rows, D] pre-scaled queries
  float* acc;  // [rows, D]
  float* m;    // [rows]
  float* l;    // [rows]
  float* S;    // [rows, kKeyTile] scores, then probabilities
  float* Kf;   // [kKeyTile, D] fp32 copy of one head's key tile (bf16/fp16 caches)
  float* Vf;   // [kKeyTile, D]
  float* Qt;   // wide path: per head [D, RP] transposed queries
  float* wm;   // wide path, one head: [RP] m, l, rescale factors, visible-key bounds
  float* wl;
  float* wa;
  float* wlo;
  float* whi;
  std::unique_ptr<int64_t[]> ibuf;
  int64_t* ra;  // [queries] per-query visible key range [ra, rb) within the item
  int64_t* rb;
  const void* kp[kKeyTile];  // K/V rows of the current tile and head (cache dtype, or fp32 copies)
  const void* vp[kKeyTile];
  const void* kb[2][kKeyTile];  // K/V rows (head h0) of the current / next tile's tokens
  const void* vb[2][kKeyTile];

  Scratch(int max_rows, int max_queries, int D) {
    // One head's rows rounded up to a vector: <= max_rows + 64. All heads' transposed queries
    // (wide path, >= kWideMinRows rows per head): sum of rph rounded up to W < 2 * max_rows.
    const int64_t padded = max_rows + 64;
    const int64_t qt = (2LL * max_rows + 64) * D;
    const int64_t n = 2LL * max_rows * D + 2LL * max_rows + padded * kKeyTile +
                      2LL * kKeyTile * D + qt + 5 * padded + 64;
    buf.reset(new float[n]);
    float* p = buf.get();
    Q = p, p += int64_t(max_rows) * D;
    acc = p, p += int64_t(max_rows) * D;
    m = p, p += max_rows;
    l = p, p += max_rows;
    S = p, p += padded * kKeyTile;
    Kf = p, p += int64_t(kKeyTile) * D;
    Vf = p, p += int64_t(kKeyTile) * D;
    Qt = p, p += qt;
    wm = p, p += padded;
    wl = p, p += padded;
    wa = p, p += padded;
    wlo = p, p += padded;
    whi = p;
    ibuf.reset(new int64_t[2 * max_queries]);
    ra = ibuf.get();
    rb = ra + max_queries;
  }
};

// Write one finished row: out = acc / L, lse = log L (with the sink folded in, see top comment).
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

// Addresses of the K/V rows (head h0) of keys [t0, t1), walking the block table: only the pages
// that hold these keys are looked up.
template <typename T>
KVMEM_INLINE void gather_tile(const Args<T>& a, const int32_t* bt_row, const T* kbase,
                              const T* vbase, int64_t t0, int64_t t1, const void** kb,
                              const void** vb) {
  const int BS = a.BS;
  int64_t blk = t0 / BS;
  int off = static_cast<int>(t0 % BS);
  int64_t page = bt_row[blk * a.bt_sm];
  const int n = static_cast<int>(t1 - t0);
  for (int j = 0; j < n; ++j) {
    if (off == BS) {
      off = 0;
      ++blk;
      page = bt_row[blk * a.bt_sm];
    }
    kb[j] = kbase + page * a.k_sb + off * a.k_ss;
    vb[j] = vbase + page * a.v_sb + off * a.v_ss;
    ++off;
  }
}

// Walks the cache lines of the next key tile's K (or V) rows, heads [h0, h0 + nh) of each token,
// issuing software prefetches (prefetcht1: into L2, as a tile of up to 32 keys x all heads of an item
// is larger than L1) a few lines at a time from inside the compute loops, so
// that the next tile streams in while this one is computed (one burst of prefetches would just
// stall on the line-fill buffers).
struct PrefetchCursor {
  const void* const* base = nullptr;  // per token: its row of head h0
  int ntok = 0, nh = 0, tok = 0, head = 0;
  int64_t head_stride = 0;  // bytes between heads
  int64_t row_bytes = 0;    // bytes prefetched per (token, head)
  const char* p = nullptr;  // next line, and the end of the current span
  const char* end = nullptr;

  void reset(const void* const* b, int n, int heads, int64_t hstride, int64_t rbytes) {
    base = b, ntok = n, nh = heads, head_stride = hstride, row_bytes = rbytes;
    if (hstride == rbytes) nh = 1, row_bytes = rbytes * heads;  // heads contiguous: one span
    tok = head = 0;
    p = end = nullptr;
    if (ntok > 0) start_span();
  }
  void start_span() {
    p = static_cast<const char*>(base[tok]) + head * head_stride;
    end = p + row_bytes;
  }
  int64_t lines() const { return int64_t(ntok) * nh * ((row_bytes + 63) / 64); }
  KVMEM_INLINE void issue(int count) {
#if defined(__GNUC__) || defined(__clang__)
    while (count > 0 && tok < ntok) {
      const char* stop = p + int64_t(count) * 64;
      if (stop > end) stop = end;
      for (const char* c = p; c < stop; c += 64) __builtin_prefetch(c, 0, 2);
      count -= static_cast<int>((stop - p + 63) / 64);
      p = stop;
      if (p >= end) {
        if (++head == nh) head = 0, ++tok;
        if (tok < ntok) start_span();
      }
    }
#else
    (void)count;
#endif
  }
  void drain() { issue(1 << 30); }
};

}  // namespace pa
}  // namespace cpu
}  // namespace kvmem

// =============================================================================================
// Part 2: the kernels, compiled once per ISA (this file includes itself, see the top comment)
// =============================================================================================
#define KVMEM_PA_KERNEL_PASS 1

#define KVMEM_W 4  // SSE2: 4 fp32 lanes
namespace kvmem {
namespace cpu {
namespace pa {
namespace isa_baseline {
#include "paged_attention.cpp"  // NOLINT(build/include)
}  // namespace isa_baseline
}  // namespace pa
}  // namespace cpu
}  // namespace kvmem
#undef KVMEM_W

#if KVMEM_X86_MULTIVERSION
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define KVMEM_W 8
namespace kvmem {
namespace cpu {
namespace pa {
namespace isa_avx2 {
#include "paged_attention.cpp"  // NOLINT(build/include)
}  // namespace isa_avx2
}  // namespace pa
}  // namespace cpu
}  // namespace kvmem
#undef KVMEM_W
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(                                                                 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define KVMEM_W 16
namespace kvmem {
namespace cpu {
namespace pa {
namespace isa_avx512 {
#include "paged_attention.cpp"  // NOLINT(build/include)
}  // namespace isa_avx512
}  // namespace pa
}  // namespace cpu
}  // namespace kvmem
#undef KVMEM_W
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // KVMEM_X86_MULTIVERSION

#undef KVMEM_PA_KERNEL_PASS

// =============================================================================================
// Part 3: scheduling and the op
// =============================================================================================
namespace kvmem {
namespace cpu {
namespace pa {
namespace {

template <typename T>
using ItemFn = void (*)(const Args<T>&, const Item&, Scratch&);

template <typename T>
ItemFn<T> select_item_fn() {
#if KVMEM_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return &isa_avx512::process_item<T>;
    case Isa::kAvx2:
      return &isa_avx2::process_item<T>;
    default:
      break;
  }
#endif
  return &isa_baseline::process_item<T>;
}

// Merge the split partials of one item shape and write its rows (second pass).
template <typename T>
void merge_group(const Args<T>& a, const SplitGroup& sg, float* tmp) {
  const SeqInfo& sq = a.seqs[sg.b];
  const int G = a.G, D = a.D;
  const int rph = (sg.i1 - sg.i0) * G;
  const int rows = (sg.h1 - sg.h0) * rph;
  const int64_t rec_size = int64_t(rows) * (D + 2);
  const bool has_sink = a.sink != nullptr;
  for (int r = 0; r < rows; ++r) {
    float M = kNegInf;
    for (int s = 0; s < sg.nsplit; ++s) {
      const float* rec = a.partial + sg.part + s * rec_size;
      M = std::max(M, rec[int64_t(rows) * D + r]);
    }
    float l = 0.f;
    if (M != kNegInf) {
      std::fill(tmp, tmp + D, 0.f);
      for (int s = 0; s < sg.nsplit; ++s) {
        const float* rec = a.partial + sg.part + s * rec_size;
        const float ms = rec[int64_t(rows) * D + r];
        if (ms == kNegInf) continue;  // this split saw no key of the row: skip, never read acc
        const float w = std::exp(ms - M);
        l += rec[int64_t(rows) * D + rows + r] * w;
        const float* KVMEM_RESTRICT acc = rec + int64_t(r) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) tmp[d] += acc[d] * w;
      }
    }
    const int hh = r / rph, qi = (r % rph) / G, g = r % G;
    const int64_t t = sq.q_start + sg.i0 + qi;
    const int h = (sg.h0 + hh) * G + g;
    const float sink = has_sink ? a.sink[h * a.sink_s] : 0.f;
    finalize_row(tmp, M, l, has_sink, sink, D, a.out + t * a.o_st + h * a.o_sh,
                 a.lse ? a.lse + t * a.l_st + h * a.l_sh : nullptr);
  }
}

template <typename T>
void zero_token_rows(const Args<T>& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < a.Hq; ++h) {
      fill_zero_row(a.out + t * a.o_st + h * a.o_sh, a.D);
      if (a.lse) a.lse[t * a.l_st + h * a.l_sh] = kNegInf;
    }
  }
}

template <typename T>
void run_paged_attention(Args<T>& a, const std::vector<SeqInfo>& seqs, int64_t num_tokens) {
  const int G = a.G, D = a.D;
  const int qtile = std::max(1, kRowsPerTile / G);
  const int nthreads = std::max(1, at::get_num_threads());

  // Tokens outside every sequence, and sequences without keys: out = 0, lse = -inf.
  int64_t covered_lo = num_tokens, covered_hi = 0;
  for (const SeqInfo& s : seqs) {
    if (s.q_len <= 0) continue;
    covered_lo = std::min(covered_lo, s.q_start);
    covered_hi = std::max(covered_hi, s.q_start + s.q_len);
    if (s.hi <= s.lo) zero_token_rows(a, s.q_start, s.q_start + s.q_len);
  }
  if (covered_lo >= covered_hi) {
    zero_token_rows(a, 0, num_tokens);
  } else {
    zero_token_rows(a, 0, covered_lo);
    zero_token_rows(a, covered_hi, num_tokens);
  }

  // Groups: (sequence, query tile, block of KV heads), with their key range and cost. A query
  // tile with few rows per KV head (decode) takes several KV heads at once.
  struct Group {
    int32_t b, h0, h1, i0, i1;
    int64_t ka, kb, cost;
  };
  std::vector<Group> groups;
  int64_t total_cost = 0;
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
      const int per_block = std::max(1, std::min(a.Hkv, kRowsPerTile / rph));
      const int nblocks = (a.Hkv + per_block - 1) / per_block;
      for (int hb = 0; hb < nblocks; ++hb) {  // near-equal blocks
        const int h0 = static_cast<int>(int64_t(a.Hkv) * hb / nblocks);
        const int h1 = static_cast<int>(int64_t(a.Hkv) * (hb + 1) / nblocks);
        const int64_t rows = int64_t(h1 - h0) * rph;
        const int64_t cost = (kb - ka) * (rows + 4 * (h1 - h0)) + rows * 16;  // math + K/V + fixed
        groups.push_back({b, h0, h1, static_cast<int32_t>(i0), static_cast<int32_t>(i1), ka, kb,
                          cost});
        total_cost += cost;
      }
    }
  }
  if (groups.empty()) return;

  // Split long key ranges (flash-decoding) when the work would otherwise not balance over the
  // threads: aim for ~4 items per thread, never below kMinSplitKeys keys per split.
  const int64_t target = nthreads > 1 ? std::max<int64_t>(1, total_cost / (4 * nthreads)) : 0;
  std::vector<Item> items;
  std::vector<SplitGroup> split_groups;
  int64_t part_floats = 0;
  int max_rows = 1, max_q = 1;
  items.reserve(groups.size());
  for (const Group& gr : groups) {
    const int64_t keys = gr.kb - gr.ka;
    const int64_t rows = int64_t(gr.h1 - gr.h0) * (gr.i1 - gr.i0) * G;
    max_rows = std::max<int>(max_rows, static_cast<int>(rows));
    max_q = std::max(max_q, gr.i1 - gr.i0);
    int64_t ns = 1;
    if (target > 0 && gr.cost > target && keys >= 2 * kMinSplitKeys) {
      ns = std::min((gr.cost + target - 1) / target, keys / kMinSplitKeys);
    }
    if (ns <= 1) {
      items.push_back({gr.b, gr.h0, gr.h1, gr.i0, gr.i1, gr.ka, gr.kb, -1, gr.cost});
      continue;
    }
    int64_t chunk = (keys + ns - 1) / ns;
    chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
    ns = (keys + chunk - 1) / chunk;
    split_groups.push_back(
        {gr.b, gr.h0, gr.h1, gr.i0, gr.i1, part_floats, static_cast<int32_t>(ns)});
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t ka = gr.ka + s * chunk, kb = std::min(gr.kb, ka + chunk);
      const int64_t cost = (kb - ka) * (rows + 4 * (gr.h1 - gr.h0)) + rows * 16;
      items.push_back({gr.b, gr.h0, gr.h1, gr.i0, gr.i1, ka, kb, part_floats, cost});
      part_floats += rows * (D + 2);
    }
  }
  std::unique_ptr<float[]> partial;
  if (part_floats > 0) {
    partial.reset(new float[part_floats]);
    a.partial = partial.get();
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });

  const ItemFn<T> fn = select_item_fn<T>();
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t nworkers = std::min<int64_t>(nthreads, n_items);
  std::atomic<int64_t> next{0};
  const Args<T>& ca = a;
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    Scratch sc(max_rows, max_q, D);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(ca, items[i], sc);
    }
  });

  if (!split_groups.empty()) {
    at::parallel_for(0, static_cast<int64_t>(split_groups.size()), 1, [&](int64_t g0, int64_t g1) {
      std::unique_ptr<float[]> tmp(new float[D]);
      for (int64_t g = g0; g < g1; ++g) merge_group(ca, split_groups[g], tmp.get());
    });
  }
}

}  // namespace
}  // namespace pa

void paged_attention(at::Tensor& out,                              // [T, Hq, D]
                     const std::optional<at::Tensor>& lse,         // [T, Hq] fp32
                     const at::Tensor& q,                          // [T, Hq, D]
                     const at::Tensor& k_cache,                    // [num_blocks, block_size, Hkv, D]
                     const at::Tensor& v_cache,                    // [num_blocks, block_size, Hkv, D]
                     const at::Tensor& block_table,                // [B, max_blocks] int32
                     const at::Tensor& seq_lens,                   // [B] int32
                     const at::Tensor& cu_seqlens_q,               // [B + 1] int32
                     int64_t max_seqlen_q, int64_t max_seqlen_k,   // host upper bounds (unused)
                     double scale, bool causal, int64_t window, double softcap,
                     const std::optional<at::Tensor>& sink_logits  // [Hq] fp32
) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  constexpr const char* kName = "kvmem_C::paged_attention";
  TORCH_CHECK(q.dim() == 3, kName, ": q must be [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, kName,
              ": caches must be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(out.dim() == 3 && out.sizes() == q.sizes(), kName, ": out must have q's shape");
  TORCH_CHECK(is_kvmem_float_type(q.scalar_type()), kName, ": q must be fp32, bf16 or fp16");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              kName, ": q, k_cache, v_cache and out must share a dtype");
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
  if (T == 0 || Hq == 0) return;

  // Sequence metadata (O(B) host reads; values are validated by the Python layer).
  std::vector<pa::SeqInfo> seqs(B);
  {
    const int32_t* sl = seq_lens.data_ptr<int32_t>();
    const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
    const int64_t sls = seq_lens.stride(0), cus = cu_seqlens_q.stride(0);
    for (int64_t b = 0; b < B; ++b) {
      pa::SeqInfo& s = seqs[b];
      s.q_start = cu[b * cus];
      s.q_len = int64_t(cu[(b + 1) * cus]) - s.q_start;
      s.kv_len = sl[b * sls];
      s.first_pos = s.kv_len - s.q_len;
      s.lo = window > 0 ? std::max<int64_t>(0, s.first_pos - window + 1) : 0;
      s.hi = s.kv_len;
    }
  }

  KVMEM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kName, [&] {
    pa::Args<scalar_t> a{};
    a.q = q.data_ptr<scalar_t>(), a.q_st = q.stride(0), a.q_sh = q.stride(1);
    a.kc = k_cache.data_ptr<scalar_t>();
    a.k_sb = k_cache.stride(0), a.k_ss = k_cache.stride(1), a.k_sh = k_cache.stride(2);
    a.vc = v_cache.data_ptr<scalar_t>();
    a.v_sb = v_cache.stride(0), a.v_ss = v_cache.stride(1), a.v_sh = v_cache.stride(2);
    a.bt = block_table.data_ptr<int32_t>();
    a.bt_sb = block_table.stride(0), a.bt_sm = block_table.stride(1);
    a.out = out.data_ptr<scalar_t>(), a.o_st = out.stride(0), a.o_sh = out.stride(1);
    if (lse.has_value()) {
      a.lse = lse->data_ptr<float>(), a.l_st = lse->stride(0), a.l_sh = lse->stride(1);
    }
    if (sink_logits.has_value()) {
      a.sink = sink_logits->data_ptr<float>(), a.sink_s = sink_logits->stride(0);
    }
    a.seqs = seqs.data();
    a.Hq = static_cast<int>(Hq), a.Hkv = static_cast<int>(Hkv);
    a.G = static_cast<int>(Hq / Hkv), a.D = static_cast<int>(D), a.BS = static_cast<int>(BS);
    a.softcap = softcap > 0 ? static_cast<float>(softcap) : 0.f;
    a.qscale = static_cast<float>(softcap > 0 ? scale / softcap : scale);
    a.causal = causal;
    a.window = window;
    pa::run_paged_attention<scalar_t>(a, seqs, T);
  });
}

}  // namespace cpu
}  // namespace kvmem

#else  // KVMEM_PA_KERNEL_PASS
// =============================================================================================
// Part 2 body: compiled once per ISA, inside namespace kvmem::cpu::pa::isa_<name>, with
// KVMEM_W = the number of fp32 lanes of one vector register of that ISA.
// =============================================================================================
namespace {  // internal linkage: no PLT calls between the kernels

constexpr int W = KVMEM_W;
using V = typename VecOf<W>::type;  // one vector register of fp32
using V4 = typename VecOf<4>::type;

KVMEM_INLINE V loadu(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// W consecutive elements of a row in storage dtype E, as fp32 (the conversions of cpu_utils.h,
// written on whole vectors).
template <typename E>
KVMEM_INLINE V loadv(const E* p) {
  if constexpr (std::is_same_v<E, float>) {
    return loadu(p);
  } else {
    typedef uint16_t U16 __attribute__((vector_size(2 * W)));
    typedef uint32_t U32 __attribute__((vector_size(4 * W)));
    typedef int32_t I32 __attribute__((vector_size(4 * W)));
    U16 h;
    std::memcpy(&h, p, sizeof(U16));
    const U32 x = __builtin_convertvector(h, U32);
    U32 bits;
    if constexpr (std::is_same_v<E, c10::BFloat16>) {
      bits = x << 16;
    } else {  // fp16, as fp16_bits_to_float
      const U32 sign = (x & 0x8000u) << 16;
      const U32 em = x & 0x7fffu;
      const U32 inf_nan = (U32)(em >= 0x7c00u);  // vector compares give all-ones / zero lanes
      const U32 tiny = (U32)(em < 0x0400u);
      const U32 normal_bits = (em << 13) + (112u << 23) + (inf_nan & (112u << 23));
      const V tiny_f = __builtin_convertvector((I32)em, V) * 5.9604644775390625e-8f;
      U32 tiny_bits;
      std::memcpy(&tiny_bits, &tiny_f, sizeof(V));
      bits = (tiny_bits & tiny) | (normal_bits & ~tiny) | sign;
    }
    V v;
    std::memcpy(&v, &bits, sizeof(V));
    return v;
  }
}

// (sum(a0), sum(a1), sum(a2), sum(a3)) -> out[0:4]: one transposing reduction tree for the four.
KVMEM_INLINE void reduce4(const V& a0, const V& a1, const V& a2, const V& a3, float* out) {
#if KVMEM_HAVE_SHUFFLEVECTOR
#if KVMEM_W == 16
  const V p01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                        23) +
                __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                        30, 31);
  const V p23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                        23) +
                __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                        30, 31);
  const V q = __builtin_shufflevector(p01, p23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                                      26, 27) +
              __builtin_shufflevector(p01, p23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29,
                                      30, 31);
  using V8 = typename VecOf<8>::type;
  const V8 r = __builtin_shufflevector(q, q, 0, 1, 4, 5, 8, 9, 12, 13) +
               __builtin_shufflevector(q, q, 2, 3, 6, 7, 10, 11, 14, 15);
  const V4 s = __builtin_shufflevector(r, r, 0, 2, 4, 6) + __builtin_shufflevector(r, r, 1, 3, 5, 7);
#elif KVMEM_W == 8
  const V p01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const V p23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  const V q = __builtin_shufflevector(p01, p23, 0, 1, 4, 5, 8, 9, 12, 13) +
              __builtin_shufflevector(p01, p23, 2, 3, 6, 7, 10, 11, 14, 15);
  const V4 s = __builtin_shufflevector(q, q, 0, 2, 4, 6) + __builtin_shufflevector(q, q, 1, 3, 5, 7);
#elif KVMEM_W == 4
  const V p01 = __builtin_shufflevector(a0, a1, 0, 1, 4, 5) +
                __builtin_shufflevector(a0, a1, 2, 3, 6, 7);
  const V p23 = __builtin_shufflevector(a2, a3, 0, 1, 4, 5) +
                __builtin_shufflevector(a2, a3, 2, 3, 6, 7);
  const V4 s = __builtin_shufflevector(p01, p23, 0, 2, 4, 6) +
               __builtin_shufflevector(p01, p23, 1, 3, 5, 7);
#else
#error "unsupported KVMEM_W"
#endif
  std::memcpy(out, &s, sizeof(V4));
#else
  const V* in[4] = {&a0, &a1, &a2, &a3};
  for (int i = 0; i < 4; ++i) {
    float lanes[W];
    std::memcpy(lanes, in[i], sizeof(V));
    float t = 0.f;
    for (int w = 0; w < W; ++w) t += lanes[w];
    out[i] = t;
  }
#endif
}

// ---- score micro-kernels: 4 or 8 dot products sharing their loads ---------------------------
// s[0:4] = (q0.k, q1.k, q2.k, q3.k)
template <typename E>
KVMEM_INLINE void dot_r4k1(const float* q0, const float* q1, const float* q2, const float* q3,
                           const E* k, int D, float* s) {
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int d = 0;
  for (; d + W <= D; d += W) {
    const V kd = loadv(k + d);
    a0 += loadu(q0 + d) * kd;
    a1 += loadu(q1 + d) * kd;
    a2 += loadu(q2 + d) * kd;
    a3 += loadu(q3 + d) * kd;
  }
  reduce4(a0, a1, a2, a3, s);
  for (; d < D; ++d) {
    const float kd = to_float(k[d]);
    s[0] += q0[d] * kd;
    s[1] += q1[d] * kd;
    s[2] += q2[d] * kd;
    s[3] += q3[d] * kd;
  }
}

// s[0:4] = (q0.k0, q0.k1, q1.k0, q1.k1)
template <typename E>
KVMEM_INLINE void dot_r2k2(const float* q0, const float* q1, const E* k0, const E* k1, int D,
                           float* s) {
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int d = 0;
  for (; d + W <= D; d += W) {
    const V x0 = loadu(q0 + d), x1 = loadu(q1 + d), y0 = loadv(k0 + d), y1 = loadv(k1 + d);
    a0 += x0 * y0;
    a1 += x0 * y1;
    a2 += x1 * y0;
    a3 += x1 * y1;
  }
  reduce4(a0, a1, a2, a3, s);
  for (; d < D; ++d) {
    const float y0 = to_float(k0[d]), y1 = to_float(k1[d]);
    s[0] += q0[d] * y0;
    s[1] += q0[d] * y1;
    s[2] += q1[d] * y0;
    s[3] += q1[d] * y1;
  }
}

// s[0:4] = (q.k0, q.k1, q.k2, q.k3)
template <typename E>
KVMEM_INLINE void dot_r1k4(const float* q, const E* k0, const E* k1, const E* k2, const E* k3,
                           int D, float* s) {
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int d = 0;
  for (; d + W <= D; d += W) {
    const V x = loadu(q + d);
    a0 += x * loadv(k0 + d);
    a1 += x * loadv(k1 + d);
    a2 += x * loadv(k2 + d);
    a3 += x * loadv(k3 + d);
  }
  reduce4(a0, a1, a2, a3, s);
  for (; d < D; ++d) {
    s[0] += q[d] * to_float(k0[d]);
    s[1] += q[d] * to_float(k1[d]);
    s[2] += q[d] * to_float(k2[d]);
    s[3] += q[d] * to_float(k3[d]);
  }
}

// s0[0:4] = (q0.k0, q1.k0, q2.k0, q3.k0), s1[0:4] = the same with k1
template <typename E>
KVMEM_INLINE void dot_r4k2(const float* q0, const float* q1, const float* q2, const float* q3,
                           const E* k0, const E* k1, int D, float* s0, float* s1) {
  V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  int d = 0;
  for (; d + W <= D; d += W) {
    const V y0 = loadv(k0 + d), y1 = loadv(k1 + d);
    const V x0 = loadu(q0 + d), x1 = loadu(q1 + d), x2 = loadu(q2 + d), x3 = loadu(q3 + d);
    a0 += x0 * y0;
    a1 += x1 * y0;
    a2 += x2 * y0;
    a3 += x3 * y0;
    b0 += x0 * y1;
    b1 += x1 * y1;
    b2 += x2 * y1;
    b3 += x3 * y1;
  }
  reduce4(a0, a1, a2, a3, s0);
  reduce4(b0, b1, b2, b3, s1);
  for (; d < D; ++d) {
    const float y0 = to_float(k0[d]), y1 = to_float(k1[d]);
    s0[0] += q0[d] * y0;
    s0[1] += q1[d] * y0;
    s0[2] += q2[d] * y0;
    s0[3] += q3[d] * y0;
    s1[0] += q0[d] * y1;
    s1[1] += q1[d] * y1;
    s1[2] += q2[d] * y1;
    s1[3] += q3[d] * y1;
  }
}

// Scores S[r, j - t0] = Q[r].k_j for the rows [0, rows) of one KV head (row r belongs to query
// r / G, whose visible keys are [ra, rb)), over the keys of tile [t0, t1) some row of each 4-row
// block can see. Scores of keys a row cannot see are never used.
template <typename E>
KVMEM_NOINLINE void tile_scores(const float* Q, int rows, int G, const int64_t* ra,
                                const int64_t* rb, int64_t t0, int64_t t1,
                                const void* const* kpv, int D, float* S, PrefetchCursor& pk,
                                int pk_per_key, PrefetchCursor& pv, int pv_per_key) {
  const E* const* kp = reinterpret_cast<const E* const*>(kpv);
  for (int r = 0; r < rows;) {
    const int left = rows - r;
    const int nr = left >= 4 ? 4 : (left >= 2 ? 2 : 1);
    int64_t ja = t1, jb = t0;
    for (int x = 0; x < nr; ++x) {
      const int qi = (r + x) / G;
      ja = std::min(ja, std::max(ra[qi], t0));
      jb = std::max(jb, std::min(rb[qi], t1));
    }
    const float* q0 = Q + int64_t(r) * D;
    float* s0 = S + int64_t(r) * kKeyTile;  // indexed by key - t0
    int j = static_cast<int>(ja - t0);
    const int je = static_cast<int>(jb - t0);
    float t[8];
    if (nr == 4) {
      const float *q1 = q0 + D, *q2 = q0 + 2 * D, *q3 = q0 + 3 * D;
      for (; j + 2 <= je; j += 2) {
        pk.issue(2 * pk_per_key), pv.issue(2 * pv_per_key);
        dot_r4k2(q0, q1, q2, q3, kp[j], kp[j + 1], D, t, t + 4);
        for (int x = 0; x < 4; ++x) {
          s0[x * kKeyTile + j] = t[x];
          s0[x * kKeyTile + j + 1] = t[4 + x];
        }
      }
      if (j < je) {
        dot_r4k1(q0, q1, q2, q3, kp[j], D, t);
        for (int x = 0; x < 4; ++x) s0[x * kKeyTile + j] = t[x];
      }
    } else if (nr == 2) {
      const float* q1 = q0 + D;
      for (; j + 2 <= je; j += 2) {
        pk.issue(2 * pk_per_key), pv.issue(2 * pv_per_key);
        dot_r2k2(q0, q1, kp[j], kp[j + 1], D, t);
        s0[j] = t[0], s0[j + 1] = t[1];
        s0[kKeyTile + j] = t[2], s0[kKeyTile + j + 1] = t[3];
      }
      if (j < je) {
        dot_r2k2(q0, q1, kp[j], kp[j], D, t);
        s0[j] = t[0], s0[kKeyTile + j] = t[2];
      }
    } else {
      for (; j + 4 <= je; j += 4) {
        pk.issue(4 * pk_per_key), pv.issue(4 * pv_per_key);
        dot_r1k4(q0, kp[j], kp[j + 1], kp[j + 2], kp[j + 3], D, s0 + j);
      }
      for (; j < je; ++j) {
        dot_r1k4(q0, kp[j], kp[j], kp[j], kp[j], D, t);
        s0[j] = t[0];
      }
    }
    r += nr;
  }
}

// ---- P.V micro-kernel ------------------------------------------------------------------------
// acc_r[d:d+NV*W] += sum_k p_r[k] * v[k][d:d+NV*W] for NR rows that see the same n keys: these
// output columns of every row stay in registers over all keys, and each V chunk loaded (and
// converted) is used by all NR rows.
template <int NR, int NV, typename E>
KVMEM_INLINE void pv_cols(float* const* acc, const float* const* p, int64_t ks, const E* const* v,
                          int n, int d) {
  V c[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) c[r][u] = loadu(acc[r] + d + u * W);
  }
  for (int k = 0; k < n; ++k) {
    V vv[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) vv[u] = loadv(v[k] + d + u * W);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const float x = p[r][k * ks];
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) c[r][u] += x * vv[u];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) std::memcpy(acc[r] + d + u * W, &c[r][u], sizeof(V));
  }
}

template <int NR, typename E>
KVMEM_NOINLINE void pv_block(float* const* acc, const float* const* p, int64_t ks,
                             const E* const* v, int n, int D) {
  int d = 0;
  if constexpr (W >= 16) {  // AVX-512's 32 vector registers fit 4 x 4 accumulators
    for (; d + 4 * W <= D; d += 4 * W) pv_cols<NR, 4, E>(acc, p, ks, v, n, d);
  }
  for (; d + 2 * W <= D; d += 2 * W) pv_cols<NR, 2, E>(acc, p, ks, v, n, d);
  for (; d + W <= D; d += W) pv_cols<NR, 1, E>(acc, p, ks, v, n, d);
  for (; d < D; ++d) {
    for (int r = 0; r < NR; ++r) {
      float c = acc[r][d];
      for (int k = 0; k < n; ++k) c += p[r][k * ks] * to_float(v[k][d]);
      acc[r][d] = c;
    }
  }
}

// acc += P.V over the tile for the rows [0, rows) of one KV head; p of row r and key j is
// S[r * rs + (j - t0) * ks]. Blocks of 4 rows share the V loads over the keys all four see; the
// keys only some of them see are added row by row. Masked keys are never touched. Rows whose m is
// -inf have seen nothing yet and are skipped.
template <typename E>
KVMEM_INLINE void tile_pv(float* acc, const float* S, int64_t rs, int64_t ks, const float* m,
                          int rows, int G, const int64_t* ra, const int64_t* rb, int64_t t0,
                          int64_t t1, const void* const* vpv, int D) {
  const E* const* vp = reinterpret_cast<const E* const*>(vpv);
  for (int r = 0; r < rows;) {
    const int nr = std::min(4, rows - r);
    int64_t ja[4], jb[4];
    int64_t ca = t0, cb = t1;  // keys every row of the block sees
    for (int x = 0; x < nr; ++x) {
      const int qi = (r + x) / G;
      ja[x] = std::max(ra[qi], t0);
      jb[x] = std::min(rb[qi], t1);
      if (ja[x] >= jb[x] || m[r + x] == kNegInf) ja[x] = jb[x] = t0;  // row sees nothing here
      ca = std::max(ca, ja[x]);
      cb = std::min(cb, jb[x]);
    }
    const bool joint = nr == 4 && cb > ca;
    if (joint) {
      float* accs[4];
      const float* ps[4];
      for (int x = 0; x < 4; ++x) {
        accs[x] = acc + int64_t(r + x) * D;
        ps[x] = S + int64_t(r + x) * rs + (ca - t0) * ks;
      }
      pv_block<4, E>(accs, ps, ks, vp + (ca - t0), static_cast<int>(cb - ca), D);
    }
    for (int x = 0; x < nr; ++x) {  // the rest, row by row: [ja, ca) and [cb, jb), or [ja, jb)
      float* accs[1] = {acc + int64_t(r + x) * D};
      const float* srow = S + int64_t(r + x) * rs;
      const int64_t lo_end = joint ? ca : jb[x];
      const int64_t hi_start = joint ? cb : jb[x];
      if (lo_end > ja[x]) {
        const float* ps[1] = {srow + (ja[x] - t0) * ks};
        pv_block<1, E>(accs, ps, ks, vp + (ja[x] - t0), static_cast<int>(lo_end - ja[x]), D);
      }
      if (jb[x] > hi_start) {
        const float* ps[1] = {srow + (hi_start - t0) * ks};
        pv_block<1, E>(accs, ps, ks, vp + (hi_start - t0), static_cast<int>(jb[x] - hi_start), D);
      }
    }
    r += nr;
  }
}

// ---- online softmax, on whole vectors ------------------------------------------------------
// (Written with vector types rather than `omp simd` loops: with a key range of a few dozen
// entries starting anywhere, the auto-vectoriser's alignment peeling ran most of it scalar.)
KVMEM_INLINE void storeu(float* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

KVMEM_INLINE V exp_v(V x) {  // exp_fast (cpu_utils.h) on W lanes
  typedef uint32_t VU __attribute__((vector_size(4 * W)));
  const V xc = x < 88.0f ? x : V{} + 88.0f;
  const V t = xc * 1.44269504088896341f;
  const V tm = t + 12582912.0f;
  const V nf = tm - 12582912.0f;
  VU tb;
  std::memcpy(&tb, &tm, sizeof(V));
  const VU n = tb - 0x4B400000u;  // float_to_bits(1.5 * 2^23)
  V r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  V p = V{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VU e = (n + 127u) << 23;
  V two_n;
  std::memcpy(&two_n, &e, sizeof(V));
  const V res = p * two_n;
  VU rb;
  std::memcpy(&rb, &res, sizeof(V));
  const VU keep = (VU)(!(xc < -87.0f));
  rb &= keep;
  V out;
  std::memcpy(&out, &rb, sizeof(V));
  return out;
}

KVMEM_INLINE V tanh_v(V y) {  // tanh_fast on W lanes
  typedef uint32_t VU __attribute__((vector_size(4 * W)));
  VU yb;
  std::memcpy(&yb, &y, sizeof(V));
  const VU sign = yb & 0x80000000u;
  const VU ab = yb & 0x7fffffffu;
  V ay;
  std::memcpy(&ay, &ab, sizeof(V));
  const V e = exp_v(-2.0f * ay);
  const V t = (1.0f - e) / (1.0f + e);
  VU tb;
  std::memcpy(&tb, &t, sizeof(V));
  tb |= sign;
  V out;
  std::memcpy(&out, &tb, sizeof(V));
  return out;
}

template <int N>
KVMEM_INLINE float hmax_n(const float* a) {
  if constexpr (N == 1) {
    return a[0];
  } else {
    using H = typename VecOf<N / 2>::type;
    H lo, hi;
    std::memcpy(&lo, a, sizeof(H));
    std::memcpy(&hi, a + N / 2, sizeof(H));
    const H mx = lo > hi ? lo : hi;
    float b[N / 2];
    std::memcpy(b, &mx, sizeof(H));
    return hmax_n<N / 2>(b);
  }
}
template <int N>
KVMEM_INLINE float hsum_n(const float* a) {
  if constexpr (N == 1) {
    return a[0];
  } else {
    using H = typename VecOf<N / 2>::type;
    H lo, hi;
    std::memcpy(&lo, a, sizeof(H));
    std::memcpy(&hi, a + N / 2, sizeof(H));
    const H sm = lo + hi;
    float b[N / 2];
    std::memcpy(b, &sm, sizeof(H));
    return hsum_n<N / 2>(b);
  }
}
KVMEM_INLINE float hmax(const V& v) {
  float a[W];
  std::memcpy(a, &v, sizeof(V));
  return hmax_n<W>(a);
}
KVMEM_INLINE float hsum(const V& v) {
  float a[W];
  std::memcpy(a, &v, sizeof(V));
  return hsum_n<W>(a);
}

// Online-softmax update of R rows (R = 1 or 4; their latency chains interleave) over one key tile.
// Row x sees keys [ja[x], jb[x]) (relative to the tile start), all within [ua, ub). Its scores
// S[x * kKeyTile + i] are replaced by p = e^(s - m_new) on [ua, ub), entries outside the row's
// own range becoming exactly 0 (P.V never reads them anyway); m, l and acc are rescaled. Rows with
// an empty range are left untouched.
template <int R>
KVMEM_INLINE void softmax_rows(float* S, const int* ja, const int* jb, int ua, int ub,
                               float softcap, float* m, float* l, float* acc, int D) {
  V iota;
  for (int w = 0; w < W; ++w) iota[w] = static_cast<float>(w);
  if (softcap > 0.f) {
    int i = ua;
    for (; i + W <= ub; i += W) {
      for (int x = 0; x < R; ++x) {
        float* s = S + x * kKeyTile + i;
        storeu(s, softcap * tanh_v(loadu(s)));
      }
    }
    for (; i < ub; ++i) {
      for (int x = 0; x < R; ++x) S[x * kKeyTile + i] = softcap * tanh_fast(S[x * kKeyTile + i]);
    }
  }
  // Masked max (indices compared as floats: exact for tile offsets).
  V vmx[R];
  float lo[R], hi[R];
  for (int x = 0; x < R; ++x) {
    vmx[x] = V{} + kNegInf;
    lo[x] = static_cast<float>(ja[x]);
    hi[x] = static_cast<float>(jb[x]);
  }
  int i = ua;
  for (; i + W <= ub; i += W) {
    const V idx = iota + static_cast<float>(i);
    for (int x = 0; x < R; ++x) {
      float* s = S + x * kKeyTile + i;
      const V v = loadu(s);
      const V mv = ((idx >= lo[x]) & (idx < hi[x])) ? v : V{} + kNegInf;
      storeu(s, mv);
      vmx[x] = mv > vmx[x] ? mv : vmx[x];
    }
  }
  float mx[R];
  for (int x = 0; x < R; ++x) mx[x] = hmax(vmx[x]);
  for (; i < ub; ++i) {
    for (int x = 0; x < R; ++x) {
      float& sv = S[x * kKeyTile + i];
      if (i < ja[x] || i >= jb[x]) sv = kNegInf;
      mx[x] = sv > mx[x] ? sv : mx[x];
    }
  }
  float mn[R], z[R];
  V vsum[R];
  for (int x = 0; x < R; ++x) {
    mn[x] = std::max(m[x], mx[x]);
    z[x] = mn[x] == kNegInf ? 0.f : mn[x];  // nothing finite: keep every p at exactly 0
    vsum[x] = V{};
  }
  i = ua;
  for (; i + W <= ub; i += W) {
    for (int x = 0; x < R; ++x) {
      float* s = S + x * kKeyTile + i;
      const V pv = exp_v(loadu(s) - z[x]);
      storeu(s, pv);
      vsum[x] += pv;
    }
  }
  float sum[R];
  for (int x = 0; x < R; ++x) sum[x] = hsum(vsum[x]);
  for (; i < ub; ++i) {
    for (int x = 0; x < R; ++x) {
      const float pv = exp_fast(S[x * kKeyTile + i] - z[x]);
      S[x * kKeyTile + i] = pv;
      sum[x] += pv;
    }
  }
  for (int x = 0; x < R; ++x) {
    if (ja[x] >= jb[x] || mn[x] == kNegInf) continue;
    float* KVMEM_RESTRICT ac = acc + int64_t(x) * D;
    if (m[x] != mn[x]) {
      const float alpha = exp_fast(m[x] - mn[x]);  // 0 when m == -inf
      l[x] = l[x] * alpha + sum[x];
#pragma omp simd
      for (int d = 0; d < D; ++d) ac[d] *= alpha;
    } else {
      l[x] += sum[x];
    }
    m[x] = mn[x];
  }
}

// ---- wide path: many rows per KV head (prefill) ---------------------------------------------
// Scores as a small GEMM against the transposed queries, St[j][r] = sum_d k_j[d] * Qt[d][r]
// (rows in vector lanes: no horizontal sums), and an online softmax vectorised across rows.
// Qt is [D][RP], RP = rows rounded up to W, padding rows zero.

// St[j][c0 : c0 + NV*W] for the NK keys kp[0:NK] (St row of key k at St + k * RP).
template <int NK, int NV>
KVMEM_INLINE void qk_block(const float* Qt, int RP, int c0, const float* const* kp, int D,
                           float* St) {
  V acc[NK][NV];
#pragma GCC unroll 4
  for (int k = 0; k < NK; ++k) {
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) acc[k][u] = V{};
  }
  const float* q = Qt + c0;
  for (int d = 0; d < D; ++d, q += RP) {
    V qv[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) qv[u] = loadu(q + u * W);
#pragma GCC unroll 4
    for (int k = 0; k < NK; ++k) {
      const float kd = kp[k][d];
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) acc[k][u] += kd * qv[u];
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < NK; ++k) {
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) storeu(St + int64_t(k) * RP + c0 + u * W, acc[k][u]);
  }
}

template <int NV>
KVMEM_INLINE void qk_keys(const float* Qt, int RP, int c0, const float* const* kp, int j0, int j1,
                          int D, float* St, PrefetchCursor& pk, int pk_per_key, PrefetchCursor& pv,
                          int pv_per_key) {
  int j = j0;
  for (; j + 4 <= j1; j += 4) {
    pk.issue(4 * pk_per_key), pv.issue(4 * pv_per_key);
    qk_block<4, NV>(Qt, RP, c0, kp + j, D, St + int64_t(j) * RP);
  }
  for (; j < j1; ++j) qk_block<1, NV>(Qt, RP, c0, kp + j, D, St + int64_t(j) * RP);
}

// Scores of keys [j0, j1) (tile-relative) for all RP rows of one head.
KVMEM_NOINLINE void wide_scores(const float* Qt, int RP, const void* const* kpv, int j0, int j1,
                                int D, float* St, PrefetchCursor& pk, int pk_per_key,
                                PrefetchCursor& pv, int pv_per_key) {
  const float* const* kp = reinterpret_cast<const float* const*>(kpv);
  int c = 0;
  for (; c + 4 * W <= RP; c += 4 * W) {
    qk_keys<4>(Qt, RP, c, kp, j0, j1, D, St, pk, pk_per_key, pv, pv_per_key);
  }
  for (; c + 2 * W <= RP; c += 2 * W) {
    qk_keys<2>(Qt, RP, c, kp, j0, j1, D, St, pk, pk_per_key, pv, pv_per_key);
  }
  for (; c < RP; c += W) qk_keys<1>(Qt, RP, c, kp, j0, j1, D, St, pk, pk_per_key, pv, pv_per_key);
}

// Online softmax of the RP rows of one head over tile keys [ua, ub) in the St layout: row r sees
// [lo[r], hi[r]) (tile-relative, as floats; padding rows see nothing). m, l: [RP] (padding:
// -inf, 0). alpha[r] receives the factor acc row r must be rescaled by (1: unchanged).
KVMEM_NOINLINE void wide_softmax(float* St, int RP, int ua, int ub, const float* lo,
                                 const float* hi, float softcap, float* m, float* l,
                                 float* alpha) {
  for (int c = 0; c < RP; c += W) {
    const V vlo = loadu(lo + c), vhi = loadu(hi + c);
    V mx = V{} + kNegInf;
    for (int j = ua; j < ub; ++j) {
      float* sp = St + int64_t(j) * RP + c;
      V v = loadu(sp);
      if (softcap > 0.f) v = softcap * tanh_v(v);
      const float fj = static_cast<float>(j);
      v = ((fj >= vlo) & (fj < vhi)) ? v : V{} + kNegInf;
      storeu(sp, v);
      mx = v > mx ? v : mx;
    }
    const V m_old = loadu(m + c);
    const V m_new = mx > m_old ? mx : m_old;
    const V z = m_new == kNegInf ? V{} : m_new;  // nothing finite: keep every p at exactly 0
    V sum = V{};
    for (int j = ua; j < ub; ++j) {
      float* sp = St + int64_t(j) * RP + c;
      const V p = exp_v(loadu(sp) - z);
      storeu(sp, p);
      sum += p;
    }
    const V a = m_old == m_new ? V{} + 1.0f : exp_v(m_old - m_new);  // m_old = -inf: 0
    storeu(l + c, loadu(l + c) * a + sum);
    storeu(m + c, m_new);
    storeu(alpha + c, a);
  }
}

// Process one work item (see the top comment).
template <typename T>
void process_item(const Args<T>& a, const Item& it, Scratch& sc) {
  const SeqInfo& sq = a.seqs[it.b];
  const int G = a.G, D = a.D;
  const int nq = it.i1 - it.i0;
  const int nh = it.h1 - it.h0;
  const int rph = nq * G;  // rows per KV head
  const int rows = nh * rph;
  const int64_t k0 = it.k0, k1 = it.k1;

  // Per-query visible key range, clipped to this item's keys.
  for (int qi = 0; qi < nq; ++qi) {
    const int64_t p = sq.first_pos + it.i0 + qi;
    int64_t lo = sq.lo, hi = sq.hi;
    if (a.window > 0) lo = std::max(lo, p - a.window + 1);
    if (a.causal) hi = std::min(hi, p + 1);
    sc.ra[qi] = std::max(lo, k0);
    sc.rb[qi] = std::min(hi, k1);
  }

  // Queries (pre-scaled) and running state.
  for (int hh = 0; hh < nh; ++hh) {
    for (int qi = 0; qi < nq; ++qi) {
      const T* qrow =
          a.q + (sq.q_start + it.i0 + qi) * a.q_st + int64_t(it.h0 + hh) * G * a.q_sh;
      for (int g = 0; g < G; ++g) {
        load_row_scaled(qrow + g * a.q_sh, sc.Q + int64_t((hh * nq + qi) * G + g) * D, D,
                        a.qscale);
      }
    }
  }
  for (int r = 0; r < rows; ++r) sc.m[r] = kNegInf, sc.l[r] = 0.f;
  std::fill(sc.acc, sc.acc + int64_t(rows) * D, 0.f);

  // Wide path (many rows per head): queries transposed once per item, [D, RP] per head.
  const bool wide = rph >= kWideMinRows;
  const int RP = (rph + W - 1) / W * W;
  if (wide) {
    for (int hh = 0; hh < nh; ++hh) {
      float* qt = sc.Qt + int64_t(hh) * D * RP;
      const float* qsrc = sc.Q + int64_t(hh) * rph * D;
      for (int d = 0; d < D; ++d) {
        for (int r = 0; r < rph; ++r) qt[int64_t(d) * RP + r] = qsrc[int64_t(r) * D + d];
        for (int r = rph; r < RP; ++r) qt[int64_t(d) * RP + r] = 0.f;
      }
    }
  }

  const T* kbase = a.kc + int64_t(it.h0) * a.k_sh;
  const T* vbase = a.vc + int64_t(it.h0) * a.v_sh;
  const int32_t* bt_row = a.bt + int64_t(it.b) * a.bt_sb;

  PrefetchCursor pfk, pfv;
  const int64_t row_bytes = int64_t(D) * sizeof(T);
  // bf16/fp16: with few rows per KV head (decode) convert inside the micro-kernels; with many
  // (prefill) convert each K/V row once to fp32 scratch, as every 4-row block re-reads it.
  const bool in_place = std::is_same_v<T, float> || rph <= kInPlaceMaxRows;
  int cur = 0;
  if (k0 < k1) {
    gather_tile(a, bt_row, kbase, vbase, k0, std::min<int64_t>(k1, k0 + kKeyTile), sc.kb[0],
                sc.vb[0]);
  }
  for (int64_t t0 = k0; t0 < k1; t0 += kKeyTile) {
    const int64_t t1 = std::min<int64_t>(k1, t0 + kKeyTile);
    const int n = static_cast<int>(t1 - t0);
    // Look up the next tile now; its rows are prefetched bit by bit from inside this tile's
    // compute loops (see PrefetchCursor), so memory and math overlap.
    int pf_k = 0, pf_v = 0;  // prefetches per key and row block
    if (t1 < k1) {
      const int64_t t2 = std::min<int64_t>(k1, t1 + kKeyTile);
      gather_tile(a, bt_row, kbase, vbase, t1, t2, sc.kb[cur ^ 1], sc.vb[cur ^ 1]);
      pfk.reset(sc.kb[cur ^ 1], static_cast<int>(t2 - t1), nh, a.k_sh * int64_t(sizeof(T)),
                row_bytes);
      pfv.reset(sc.vb[cur ^ 1], static_cast<int>(t2 - t1), nh, a.v_sh * int64_t(sizeof(T)),
                row_bytes);
      // Spread the lines over the nh heads x row blocks x n keys of work.
      const int blocks = wide ? (RP + 4 * W - 1) / (4 * W) : std::max(1, (rph + 3) / 4);
      const int64_t units = int64_t(nh) * blocks * n;
      pf_k = static_cast<int>((pfk.lines() + units - 1) / units);
      pf_v = static_cast<int>((pfv.lines() + units - 1) / units);
    } else {
      pfk.reset(nullptr, 0, 0, 0, 0);
      pfv.reset(nullptr, 0, 0, 0, 0);
    }
    const void* const* kb = sc.kb[cur];
    const void* const* vb = sc.vb[cur];

    for (int hh = 0; hh < nh; ++hh) {
      // This head's K/V rows for the tile: read in place (fp32, or bf16/fp16 converted inside the
      // micro-kernels when few rows use them), else converted once to fp32 scratch.
      for (int j = 0; j < n; ++j) {
        const T* kr = static_cast<const T*>(kb[j]) + int64_t(hh) * a.k_sh;
        const T* vr = static_cast<const T*>(vb[j]) + int64_t(hh) * a.v_sh;
        if (in_place) {
          sc.kp[j] = kr;
          sc.vp[j] = vr;
        } else {
          load_row(kr, sc.Kf + int64_t(j) * D, D);
          load_row(vr, sc.Vf + int64_t(j) * D, D);
          sc.kp[j] = sc.Kf + int64_t(j) * D;
          sc.vp[j] = sc.Vf + int64_t(j) * D;
        }
      }
      const int r0 = hh * rph;
      float* S = sc.S;  // consumed within this head's step
      if (wide) {
        int ua = n, ub = 0;
        for (int r = 0; r < RP; ++r) {
          float lo = 0.f, hi = 0.f;
          if (r < rph) {
            const int qi = r / G;
            const int ja = static_cast<int>(std::max(sc.ra[qi], t0) - t0);
            const int jb = static_cast<int>(std::min(sc.rb[qi], t1) - t0);
            if (ja < jb) {
              lo = static_cast<float>(ja), hi = static_cast<float>(jb);
              ua = std::min(ua, ja), ub = std::max(ub, jb);
            }
          }
          sc.wlo[r] = lo, sc.whi[r] = hi;
        }
        if (ua >= ub) continue;
        wide_scores(sc.Qt + int64_t(hh) * D * RP, RP, sc.kp, ua, ub, D, S, pfk, pf_k, pfv, pf_v);
        for (int r = 0; r < RP; ++r) {
          sc.wm[r] = r < rph ? sc.m[r0 + r] : kNegInf;
          sc.wl[r] = r < rph ? sc.l[r0 + r] : 0.f;
        }
        wide_softmax(S, RP, ua, ub, sc.wlo, sc.whi, a.softcap, sc.wm, sc.wl, sc.wa);
        float* acc = sc.acc + int64_t(r0) * D;
        for (int r = 0; r < rph; ++r) {
          sc.m[r0 + r] = sc.wm[r], sc.l[r0 + r] = sc.wl[r];
          const float alpha = sc.wa[r];
          if (alpha != 1.0f) {
            float* KVMEM_RESTRICT ac = acc + int64_t(r) * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) ac[d] *= alpha;
          }
        }
        tile_pv<float>(acc, S, 1, RP, sc.m + r0, rph, G, sc.ra, sc.rb, t0, t1, sc.vp, D);
        continue;
      }
      float* acc = sc.acc + int64_t(r0) * D;
      if (in_place) {
        tile_scores<T>(sc.Q + int64_t(r0) * D, rph, G, sc.ra, sc.rb, t0, t1, sc.kp, D, S, pfk,
                       pf_k, pfv, pf_v);
      } else {
        tile_scores<float>(sc.Q + int64_t(r0) * D, rph, G, sc.ra, sc.rb, t0, t1, sc.kp, D, S, pfk,
                           pf_k, pfv, pf_v);
      }
      for (int r = 0; r < rph;) {
        const int nr = rph - r >= 4 ? 4 : 1;  // 4 rows together, else one
        int ja[4], jb[4];
        int ua = n, ub = 0;
        for (int x = 0; x < nr; ++x) {
          const int qi = (r + x) / G;
          ja[x] = static_cast<int>(std::max(sc.ra[qi], t0) - t0);
          jb[x] = static_cast<int>(std::min(sc.rb[qi], t1) - t0);
          if (ja[x] < jb[x]) ua = std::min(ua, ja[x]), ub = std::max(ub, jb[x]);
        }
        if (ua < ub) {
          if (nr == 4) {
            softmax_rows<4>(S + int64_t(r) * kKeyTile, ja, jb, ua, ub, a.softcap, sc.m + r0 + r,
                            sc.l + r0 + r, acc + int64_t(r) * D, D);
          } else {
            softmax_rows<1>(S + int64_t(r) * kKeyTile, ja, jb, ua, ub, a.softcap, sc.m + r0 + r,
                            sc.l + r0 + r, acc + int64_t(r) * D, D);
          }
        }
        r += nr;
      }
      if (in_place) {
        tile_pv<T>(acc, S, kKeyTile, 1, sc.m + r0, rph, G, sc.ra, sc.rb, t0, t1, sc.vp, D);
      } else {
        tile_pv<float>(acc, S, kKeyTile, 1, sc.m + r0, rph, G, sc.ra, sc.rb, t0, t1, sc.vp, D);
      }
    }
    pfk.drain();  // whatever the loops did not issue (rows that saw few keys)
    pfv.drain();
    cur ^= 1;
  }

  if (it.part >= 0) {  // split: keep the raw partial state
    float* rec = a.partial + it.part;
    std::copy(sc.acc, sc.acc + int64_t(rows) * D, rec);
    std::copy(sc.m, sc.m + rows, rec + int64_t(rows) * D);
    std::copy(sc.l, sc.l + rows, rec + int64_t(rows) * D + rows);
    return;
  }
  const bool has_sink = a.sink != nullptr;
  for (int r = 0; r < rows; ++r) {
    const int hh = r / rph, qi = (r % rph) / G, g = r % G;
    const int64_t t = sq.q_start + it.i0 + qi;
    const int h = (it.h0 + hh) * G + g;
    const float sink = has_sink ? a.sink[h * a.sink_s] : 0.f;
    finalize_row(sc.acc + int64_t(r) * D, sc.m[r], sc.l[r], has_sink, sink, D,
                 a.out + t * a.o_st + h * a.o_sh, a.lse ? a.lse + t * a.l_st + h * a.l_sh : nullptr);
  }
}

}  // namespace

#endif  // KVMEM_PA_KERNEL_PASS
