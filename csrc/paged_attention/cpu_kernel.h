// Definitions the paged-attention CPU kernel's per-ISA copies share (cpu_kernel.inc, compiled
// once per ISA by common/cpu_per_isa.h) and the op's glue (cpu.cpp): tile sizes, per-sequence
// facts, the kernel's arguments, per-thread scratch, and the block-table walk.
#pragma once

#include <cstdint>
#include <memory>

#include "common/cpu_isa.h"
#include "paged_attention/params.h"

namespace kvmem {
namespace cpu {
namespace pa {

constexpr int kKeyTile = 32;            // keys per tile (independent of the page size)
constexpr int kRowsPerTile = 64;        // target (query, head) rows per work item
constexpr int64_t kMinSplitKeys = 256;  // never split a key range into chunks smaller than this
constexpr int kInPlaceMaxRows = 8;      // bf16/fp16 K/V converted on the fly up to this many rows
constexpr int kWideMinRows = 16;        // from this many rows per KV head: the GEMM-style path

// Per sequence: its query tokens [q_start, q_start + q_len), kv_len keys, the position of its first
// query, and the keys any of its queries can see: [lo, hi).
struct SeqInfo {
  int64_t q_start, q_len, kv_len, first_pos, lo, hi;
};

// q's (and out's) storage dtype: the kernel body is compiled per cache dtype only; queries are
// converted to fp32 on load and rows written back through a switch on this.
enum class QDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// The kernel's arguments: the op's parameters plus the CPU schedule's state.
struct PagedAttentionCpuArgs : PagedAttentionParams {
  const SeqInfo* seqs;  // [B]
  float* partial;       // split records (common/cpu_softmax.h), or null without splits
  float qscale;         // scale, or scale / softcap
  QDtype q_dtype;
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
  float* R;    // [D] one decoded key row before its rotation (float8 caches with RoPE on load)
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
                      2LL * kKeyTile * D + D + qt + 5 * padded + 64;
    buf.reset(new float[n]);
    float* p = buf.get();
    Q = p, p += int64_t(max_rows) * D;
    acc = p, p += int64_t(max_rows) * D;
    m = p, p += max_rows;
    l = p, p += max_rows;
    S = p, p += padded * kKeyTile;
    Kf = p, p += int64_t(kKeyTile) * D;
    Vf = p, p += int64_t(kKeyTile) * D;
    R = p, p += D;
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

// Addresses of the K/V rows (head h0) of keys [t0, t1), walking the block table: only the pages
// that hold these keys are looked up.
template <typename T>
KVMEM_INLINE void gather_tile(const PagedAttentionCpuArgs& a, const int32_t* bt_row, const T* kbase,
                              const T* vbase, int64_t t0, int64_t t1, const void** kb,
                              const void** vb) {
  const int BS = a.block_size;
  int64_t blk = t0 / BS;
  int off = static_cast<int>(t0 % BS);
  int64_t page = bt_row[blk * a.table_stride_m];
  const int n = static_cast<int>(t1 - t0);
  for (int j = 0; j < n; ++j) {
    if (off == BS) {
      off = 0;
      ++blk;
      page = bt_row[blk * a.table_stride_m];
    }
    kb[j] = kbase + page * a.k_stride_b + off * a.k_stride_s;
    vb[j] = vbase + page * a.v_stride_b + off * a.v_stride_s;
    ++off;
  }
}

}  // namespace pa
}  // namespace cpu
}  // namespace kvmem
