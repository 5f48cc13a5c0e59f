// Variable-length batches on the device (cu_seqlens): which sequence owns a token. Device code
// only, no torch headers.
#pragma once

#include <stdint.h>

namespace kvmem {

// Index b of the sequence owning token t: cu[b] <= t < cu[b + 1] (segments may be empty);
// -1 when no sequence owns t (t outside [cu[0], cu[num_seqs]), or no sequences).
__device__ __forceinline__ int sequence_of_token(const int32_t* cu, int num_seqs, int t) {
  if (num_seqs <= 0 || t < __ldg(cu) || t >= __ldg(cu + num_seqs)) return -1;
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace kvmem
