// Software prefetch of the next key tile's K/V rows, spread over the current tile's compute
// loops (PrefetchCursor), for kvmem's CPU attention kernels.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"

namespace kvmem {
namespace cpu {

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

}  // namespace cpu
}  // namespace kvmem
