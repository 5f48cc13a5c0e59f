"""Shared-prefix (cascade) decode vs plain paged decode, op level, one decode step (not a test).

    python benchmarks/bench_cascade.py [--device cpu] [--batch 32] [--prefix 8192] [--suffix 64]
                                       [--rounds 7] [--reps 3] [--threads N] [--quick]

A batch of ``--batch`` rows decoding over one shared ``--prefix``-token prefix (the same pages in
every row, as ``prefix_cache=True`` reuses them) plus a ``--suffix``-token suffix of each row's
own; 32 q / 8 KV heads, d=128, page 16, shuffled page ids, fp32 on CPU (bf16 on a GPU). Timed:

* ``plain``: ``kvmem.paged_attention`` decode over the full tables (reads the prefix once per row);
* ``cascade``: ``kvmem.ops.cascade_decode`` (the prefix once for the batch, the suffixes per row,
  merged).

Both in the same run, interleaved: each of ``--rounds`` rounds times plain then cascade (order
alternating per round), each sample the median of ``--reps`` calls; the speed-up is the median
over rounds of the per-round ratio, so a load change on a shared machine hits both sides. Writes
JSON under benchmarks/results/. Issue target: >= 2.5x on CPU (B=32, 8k prefix, fp32).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys

import torch

import kvmem
from kvmem.bench import report
from kvmem.bench.timing import median_time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 2.5


def make_inputs(batch, prefix, suffix, *, heads=32, kv_heads=8, head_dim=128, block_size=16, dtype, device, seed=0):
    """Random (never zero) pages with shuffled ids: ``prefix // block_size`` shared pages + each
    row's own ``ceil(suffix / block_size)``."""
    g = torch.Generator().manual_seed(seed)
    P, own = prefix // block_size, -(-suffix // block_size)
    num_blocks = P + batch * own
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    shared, rest = perm[:P], perm[P:].view(batch, own)
    full = torch.cat([shared.expand(batch, P), rest], dim=1).contiguous()
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype).to(device)
    lens = torch.full((batch,), suffix, dtype=torch.int32)
    mv = lambda t: t.to(device)  # noqa: E731
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, shared=mv(shared), suffix_table=mv(rest.contiguous()),
                suffix_lens=mv(lens), full_table=mv(full), full_lens=mv(lens + prefix),
                cu=mv(torch.arange(batch + 1, dtype=torch.int32)), max_k=prefix + suffix, suffix=suffix)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", HERE, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=None, help="shared tokens (default 8192 CPU, 32768 GPU)")
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="B=8, 1k prefix, 3 rounds (a smoke run)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    prefix = args.prefix or (8192 if dev.type == "cpu" else 32768)
    batch, rounds = args.batch, args.rounds
    if args.quick:
        batch, prefix, rounds = 8, 1024, 3
    machine = report.machine_info(dev)
    print(report.describe_machine(machine))
    x = make_inputs(batch, prefix, args.suffix, dtype=dtype, device=dev)
    scale = 128 ** -0.5

    def plain():
        return kvmem.paged_attention(x["q"], x["k_cache"], x["v_cache"], x["full_table"], x["full_lens"], x["cu"],
                                     1, x["max_k"], scale=scale, check=False)

    def cascade():
        return kvmem.ops.cascade_decode(x["q"], x["k_cache"], x["v_cache"], x["shared"], x["suffix_table"],
                                        x["suffix_lens"], x["suffix"], scale=scale, check=False)

    err = (plain().float() - cascade().float()).abs().max().item()
    print(f"batch {batch}, shared prefix {prefix} tokens, suffix {args.suffix} per row, 32/8 heads, d=128, page 16, "
          f"{str(dtype).replace('torch.', '')}; max|plain - cascade| = {err:.2e}")
    times = {"plain": [], "cascade": []}
    ratios = []
    for r in range(rounds):
        order = ("plain", "cascade") if r % 2 == 0 else ("cascade", "plain")
        got = {}
        for name in order:
            got[name] = median_time(plain if name == "plain" else cascade, device=dev, warmup=1, reps=args.reps)
            times[name].append(got[name])
        ratios.append(got["plain"] / got["cascade"])
        print(f"round {r}: plain {got['plain'] * 1e3:8.2f} ms  cascade {got['cascade'] * 1e3:8.2f} ms  "
              f"speed-up {ratios[-1]:.2f}x")
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = statistics.median(ratios)
    print(f"median: plain {med['plain'] * 1e3:.2f} ms ({min(times['plain']) * 1e3:.2f}-{max(times['plain']) * 1e3:.2f}), "
          f"cascade {med['cascade'] * 1e3:.2f} ms ({min(times['cascade']) * 1e3:.2f}-{max(times['cascade']) * 1e3:.2f}), "
          f"speed-up {speedup:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    if not args.quick and dev.type == "cpu":
        print(f"target cascade >= {TARGET}x plain (B=32, 8k prefix, fp32 CPU): "
              f"{'MET' if speedup >= TARGET else 'NOT MET'}")
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU numbers: keep the evidence
        machine["load_avg_1m_end"] = os.getloadavg()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cascade_{dev.type}_{str(dtype).replace('torch.', '')}_{stamp}.json")
    report.write_json(path, dict(date=stamp, machine=machine, commit=_commit(), batch=batch, prefix=prefix,
                                 suffix=args.suffix, rounds=rounds, reps=args.reps, max_abs_diff=err,
                                 plain_s=times["plain"], cascade_s=times["cascade"], ratios=ratios,
                                 median_plain_s=med["plain"], median_cascade_s=med["cascade"], speedup=speedup))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
