"""Memory-bank decode step vs full paged attention over the same history (CPU). Not a test.

A memory-mode decode step is ``memory_select`` (score every bank block's summary, top-k per
(row, KV head); through ``kvmem.ops.memory_select``'s dispatch, i.e. the C++ CPU kernel) followed by
``kvmem.ops.memory_attention`` (sinks + selected blocks + local window, the composite on the cpu
paged kernels). It is timed against ``kvmem.paged_attention`` (cpu backend) over the whole
history, and with the torch reference ``memory_select`` in place of the C++ one.

    python benchmarks/bench_memory.py [--histories 8192 32768 131072] [--batches 1] [--reps 12]
                                      [--warmup 3] [--quick]

Data: random fp32 K/V (never zeros) in 16-token pages, shuffled block tables, summaries (``--summary``,
default the ``kvmem.MemoryConfig`` default) of every bank page written beforehand (at eviction, between steps: not timed). Memory config per
history L: 64 sink tokens (4 blocks), a window of ~2.5 % of L (whole blocks), top_k blocks so that
top_k * 16 + window ~ 5 % of L. Each round times every implementation once, in an order rotated
per round; the table gives medians over ``--reps`` timed rounds after ``--warmup`` rounds. Issue
target: the memory step >= 5x faster than full attention at 128k.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's kvmem, run from anywhere

import kvmem  # noqa: E402
from kvmem import dispatch  # noqa: E402
from kvmem.bench import report  # noqa: E402
from kvmem.bench.inputs import paged_batch  # noqa: E402
from kvmem.memory.config import SUMMARIES  # noqa: E402
from kvmem.ops.memory_attention import memory_attention  # noqa: E402
from kvmem.ops.memory_select import memory_select, reference as select_reference, write_summaries  # noqa: E402

BLOCK = 16
SINK_TOKENS = 64
SHAPES = [("32/8 d128", 32, 8, 128), ("SmolLM2 9/3 d64", 9, 3, 64)]  # (name, Hq, Hkv, D)
TARGET_SPEEDUP, TARGET_HISTORY = 5.0, 131072


def memory_config(history: int) -> dict:
    """Sink blocks, window blocks and top_k for a history of ``history`` tokens."""
    window_blocks = max(1, round(0.025 * history / BLOCK))
    top_k = max(1, round((0.05 * history - window_blocks * BLOCK) / BLOCK))
    return dict(sink_blocks=SINK_TOKENS // BLOCK, window_blocks=window_blocks, top_k=top_k)


class Case:
    """One (shape, batch, history) case: the paged batch, its bank and summaries, the callables."""

    def __init__(self, shape, batch: int, history: int, seed: int = 0, summary: str = "minmax"):
        self.name, hq, hkv, d = shape
        self.summary = summary
        self.batch, self.history = batch, history
        self.cfg = memory_config(history)
        pb = paged_batch(batch, history, 1, hq, hkv, d, block_size=BLOCK, seed=seed)
        self.pb = pb
        blocks = history // BLOCK
        sink, w0 = self.cfg["sink_blocks"], blocks - self.cfg["window_blocks"]
        self.window_start = torch.full((batch,), w0, dtype=torch.int32)
        self.bank_table = pb.block_table[:, sink:w0].contiguous()
        self.bank_lens = torch.full((batch,), w0 - sink, dtype=torch.int32)
        self.summaries = torch.full((pb.k_cache.shape[0], hkv, 2, d), float("nan"))
        write_summaries(self.summaries, pb.k_cache, self.bank_table.flatten(), summary=summary, check=False)
        self.top_k = self.cfg["top_k"]
        self.selected = self.select_cpp()

    def select_cpp(self):
        return memory_select(self.pb.q, self.summaries, self.bank_table, self.bank_lens, self.pb.cu_seqlens_q,
                             self.top_k, summary=self.summary, check=False)

    def select_torch(self):
        return select_reference.memory_select(self.pb.q, self.summaries, self.bank_table, self.bank_lens,
                                              self.pb.cu_seqlens_q, self.top_k, summary=self.summary)

    def attend(self, selected):
        pb = self.pb
        # max_seqlen_k as the HF integration passes it (kvmem.memory.step): the longest *compacted* key
        # count, sinks + selected + window keys, which bounds the compacted tables' width
        compacted = self.history - (int(self.window_start[0]) - self.cfg["sink_blocks"] - self.top_k) * BLOCK
        return memory_attention(pb.q, pb.k_cache, pb.v_cache, pb.block_table, pb.seq_lens, pb.cu_seqlens_q, 1,
                                compacted, sink_blocks=self.cfg["sink_blocks"], window_start=self.window_start,
                                bank_table=self.bank_table, selected=selected, check=False)

    def full(self):
        pb = self.pb
        return kvmem.paged_attention(pb.q, pb.k_cache, pb.v_cache, pb.block_table, pb.seq_lens, pb.cu_seqlens_q,
                                     1, self.history, check=False)

    def impls(self):
        return [("full", self.full),
                ("memory step", lambda: self.attend(self.select_cpp())),
                ("memory step (torch select)", lambda: self.attend(self.select_torch())),
                ("select C++", self.select_cpp),
                ("select torch", self.select_torch),
                ("memory_attention", lambda: self.attend(self.selected))]


def measure(impls, warmup: int, reps: int) -> dict:
    """Interleaved single-call timings: ``{name: [seconds per timed round]}``."""
    times = {name: [] for name, _ in impls}
    for r in range(warmup + reps):
        k = r % len(impls)
        for name, fn in impls[k:] + impls[:k]:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def run(args) -> dict:
    rows = []
    for shape in SHAPES:
        for history in args.histories:
            for batch in args.batches:
                if batch > 1 and history > args.max_batched_history:
                    continue
                case = Case(shape, batch, history, summary=args.summary)
                times = measure(case.impls(), args.warmup, args.reps)
                med = {name: statistics.median(ts) for name, ts in times.items()}
                row = dict(shape=case.name, batch=batch, history=history, summary=args.summary, **case.cfg,
                           bank_blocks=int(case.bank_lens[0]), attended_tokens=(case.cfg["sink_blocks"] + case.top_k
                                                                                + case.cfg["window_blocks"]) * BLOCK,
                           median_s=med, min_s={n: min(t) for n, t in times.items()},
                           max_s={n: max(t) for n, t in times.items()},
                           speedup=med["full"] / med["memory step"],
                           speedup_torch_select=med["full"] / med["memory step (torch select)"],
                           select_share=med["select C++"] / (med["select C++"] + med["memory_attention"]),
                           load_avg_1m=os.getloadavg()[0])
                rows.append(row)
                print(format_row(row), flush=True)
                del case
    return dict(rows=rows)


HEADER = ("| shape | B | history | top_k / window blocks | full (ms) | memory step (ms) | speedup | select C++ (ms) "
          "| attention (ms) | scoring share | select torch (ms) | memory step, torch select (ms) | speedup | load |")


def format_row(r: dict) -> str:
    m = {k: v * 1e3 for k, v in r["median_s"].items()}
    return (f"| {r['shape']} | {r['batch']} | {r['history'] // 1024}k | {r['top_k']} / {r['window_blocks']} "
            f"| {m['full']:.2f} | {m['memory step']:.2f} | {r['speedup']:.1f}x | {m['select C++']:.2f} "
            f"| {m['memory_attention']:.2f} | {100 * r['select_share']:.0f} % | {m['select torch']:.2f} "
            f"| {m['memory step (torch select)']:.2f} | {r['speedup_torch_select']:.1f}x | {r['load_avg_1m']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--histories", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--max-batched-history", type=int, default=32768, help="B > 1 only up to this history")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="8k only, few repeats (a smoke run)")
    ap.add_argument("--summary", default=kvmem.MemoryConfig().summary, choices=SUMMARIES,
                    help="block summaries (default: MemoryConfig's)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory_cpu_float32_<UTC>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.histories, args.warmup, args.reps = [8192], 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["KVMEM_BACKEND"] = "cpu"  # every dispatched op on the C++ CPU kernels (or their composite)
    dispatch._select.cache_clear()
    machine = report.machine_info(torch.device("cpu"))
    print(report.describe_machine(machine), file=sys.stderr)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    result = run(args)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out or os.path.join(HERE, "results", f"memory_cpu_float32_{stamp}.json")
    big = [r for r in result["rows"] if r["history"] == TARGET_HISTORY]
    for r in big:
        ok = r["speedup"] >= TARGET_SPEEDUP
        print(f"target ({r['shape']}, B={r['batch']}, 128k): memory step {r['speedup']:.1f}x faster than full "
              f"attention (>= {TARGET_SPEEDUP:.0f}x: {'met' if ok else 'NOT met'})")
    report.write_json(path, dict(machine=machine, args=vars(args), utc=stamp, block_size=BLOCK,
                                 sink_tokens=SINK_TOKENS, **result))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
