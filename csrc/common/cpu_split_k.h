// Split-K scheduling for kvmem's CPU attention kernels (flash-decoding on the CPU).
//
// An op describes its work as groups: the rows of sequence b, KV heads [h0, h1) and queries
// [i0, i1) (a query tile), over their visible keys [ka, kb). plan_split_k() turns the groups
// into work items: a group whose key range is long relative to the machine's parallelism is cut
// along keys into splits (each writing an (m, l, acc) partial record, common/cpu_softmax.h, that a
// second pass merges); items are ordered largest first, and run_work_items() hands them out
// dynamically over at::parallel_for's threads, each thread with its own scratch.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace kvmem {
namespace cpu {

// Rows of sequence b, KV heads [h0, h1), queries [i0, i1), over keys [ka, kb).
struct WorkGroup {
  int32_t b, h0, h1, i0, i1;
  int64_t ka, kb;
};

// One unit of work: a group, or one split of it, over keys [k0, k1). Row r of the item is
// ((h - h0) * nq + qi) * G + g (query head h * G + g, query i0 + qi, nq = i1 - i0).
struct WorkItem {
  int32_t b, h0, h1, i0, i1;
  int64_t k0, k1;
  int64_t part;  // -1: finalise into out/lse; else float offset of this split's partial record
  int64_t cost;
};

// A group whose key range was split: its nsplit records are consecutive from `part`.
struct SplitGroup {
  int32_t b, h0, h1, i0, i1;
  int64_t part;
  int32_t nsplit;
};

struct SplitKPlan {
  std::vector<WorkItem> items;          // largest cost first
  std::vector<SplitGroup> split_groups;  // to merge after all items ran
  int64_t partial_floats = 0;           // size of the partial records of all splits
  int max_rows = 1, max_queries = 1;    // per item: for sizing per-thread scratch
};

// Relative cost of `rows` rows over `keys` keys read from `heads` KV heads: math + K/V + fixed.
inline int64_t work_cost(int64_t keys, int64_t rows, int64_t heads) {
  return keys * (rows + 4 * heads) + rows * 16;
}

// Items for `groups` (G query heads per KV head, head dim D) on `num_threads` threads: a group is
// split when the work would otherwise not balance (aim: ~4 items per thread), into chunks that
// are multiples of key_tile keys and never shorter than min_split_keys.
SplitKPlan plan_split_k(const std::vector<WorkGroup>& groups, int G, int D, int num_threads,
                        int key_tile, int64_t min_split_keys);

// run(item, scratch) for every item, items taken dynamically in order by min(threads, items)
// workers; each worker makes its scratch once with make_scratch().
template <typename MakeScratch, typename Run>
void run_work_items(const std::vector<WorkItem>& items, int num_threads,
                    MakeScratch&& make_scratch, Run&& run) {
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t nworkers = std::min<int64_t>(num_threads, n_items);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    auto sc = make_scratch();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      run(items[i], sc);
    }
  });
}

}  // namespace cpu
}  // namespace kvmem
