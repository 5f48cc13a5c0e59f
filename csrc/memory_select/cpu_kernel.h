// Definitions the memory_select CPU kernel's per-ISA copies (cpu_kernel.inc, compiled once per
// ISA by common/cpu_per_isa.h) and the op's glue (cpu.cpp) share.
#pragma once

#include <cstdint>

#include "memory_select/params.h"

namespace kvmem {
namespace cpu {
namespace ms {

constexpr int64_t kMinTileBlocks = 64;  // never split a row's bank into tiles smaller than this
constexpr int kItemsPerThread = 4;      // scoring work items per thread (load balance)
constexpr int64_t kSerialMacs = 1 << 20;   // fewer scoring multiply-adds: one thread scores
constexpr int64_t kSerialSelect = 1 << 15;  // fewer (position, KV head) scores: one thread selects

// The kernel's arguments: the op's parameters plus the glue's fp32 copies and outputs.
struct MemorySelectCpuArgs : MemorySelectParams {
  const float* qf;       // [B, Hq, D] fp32: each row's selecting query (rows without one unused)
  const int64_t* live;   // [B] bank positions to score: bank_lens[b] clamped, 0 without a query
  float* scores;         // [B, Hq, stride_row] fp32 scratch: per query head, before the group rule
  int64_t score_stride;  // max_b live[b]
};

}  // namespace ms
}  // namespace cpu
}  // namespace kvmem
