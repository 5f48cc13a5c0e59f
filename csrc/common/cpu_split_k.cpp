// Split-K planning (cpu_split_k.h).
#include "common/cpu_split_k.h"

namespace kvmem {
namespace cpu {

SplitKPlan plan_split_k(const std::vector<WorkGroup>& groups, int G, int D, int num_threads,
                        int key_tile, int64_t min_split_keys) {
  SplitKPlan plan;
  int64_t total_cost = 0;
  for (const WorkGroup& gr : groups) {
    const int64_t rows = int64_t(gr.h1 - gr.h0) * (gr.i1 - gr.i0) * G;
    total_cost += work_cost(gr.kb - gr.ka, rows, gr.h1 - gr.h0);
  }
  const int64_t target =
      num_threads > 1 ? std::max<int64_t>(1, total_cost / (4 * num_threads)) : 0;
  plan.items.reserve(groups.size());
  for (const WorkGroup& gr : groups) {
    const int64_t keys = gr.kb - gr.ka;
    const int64_t rows = int64_t(gr.h1 - gr.h0) * (gr.i1 - gr.i0) * G;
    const int64_t cost = work_cost(keys, rows, gr.h1 - gr.h0);
    plan.max_rows = std::max<int>(plan.max_rows, static_cast<int>(rows));
    plan.max_queries = std::max(plan.max_queries, gr.i1 - gr.i0);
    int64_t ns = 1;
    if (target > 0 && cost > target && keys >= 2 * min_split_keys) {
      ns = std::min((cost + target - 1) / target, keys / min_split_keys);
    }
    if (ns <= 1) {
      plan.items.push_back({gr.b, gr.h0, gr.h1, gr.i0, gr.i1, gr.ka, gr.kb, -1, cost});
      continue;
    }
    int64_t chunk = (keys + ns - 1) / ns;
    chunk = (chunk + key_tile - 1) / key_tile * key_tile;
    ns = (keys + chunk - 1) / chunk;
    plan.split_groups.push_back(
        {gr.b, gr.h0, gr.h1, gr.i0, gr.i1, plan.partial_floats, static_cast<int32_t>(ns)});
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t ka = gr.ka + s * chunk, kb = std::min(gr.kb, ka + chunk);
      plan.items.push_back({gr.b, gr.h0, gr.h1, gr.i0, gr.i1, ka, kb, plan.partial_floats,
                            work_cost(kb - ka, rows, gr.h1 - gr.h0)});
      plan.partial_floats += rows * (D + 2);
    }
  }
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });
  return plan;
}

}  // namespace cpu
}  // namespace kvmem
