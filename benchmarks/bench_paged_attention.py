"""Paged attention vs torch SDPA on a contiguous copy of the same data (CPU or GPU).

Reports time, GB/s of K/V read, % of the read bandwidth measured in the same run, and GFLOP/s.
Writes JSON under benchmarks/results/. Not a test.

    python benchmarks/bench_paged_attention.py [--device cpu] [--dtype float32] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

import kvmem
from kvmem import backends
from kvmem.bench.inputs import paged_batch
from kvmem.bench.timing import median_time, read_bandwidth

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HERE = os.path.dirname(os.path.abspath(__file__))


def cases(quick: bool):
    # (label, batch, ctx, q_len); heads 32/8, d=128, page 16 — the decode target shape first.
    if quick:
        return [("decode", 2, 1024, 1), ("prefill", 1, 512, 512)]
    return [("decode", 8, 4096, 1), ("decode", 1, 16384, 1), ("prefill", 1, 2048, 2048),
            ("prefill+prefix", 2, 4096, 512)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    bw = read_bandwidth(dev, nbytes=1 << (28 if a.quick else 30))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    print(f"machine: {machine}\nmeasured read bandwidth: {bw / 1e9:.2f} GB/s")
    rows = []
    for label, batch_size, ctx, q_len in cases(a.quick):
        b = paged_batch(batch_size, ctx, q_len, 32, 8, 128, a.block_size, dtype, dev)
        causal = q_len > 1
        call = backends.Call.paged_attention(b.q, b.k_cache, b.v_cache, b.max_seqlen_q)
        name = backends.select(call).name
        kv_fn = lambda: kvmem.paged_attention(*b.args(), check=False)  # noqa: E731
        q, k, v = b.dense()
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal and q_len == ctx, enable_gqa=True)  # noqa: E731
        if causal and q_len != ctx:  # bottom-right causal with a cached prefix: explicit mask
            mask = torch.ones(q_len, ctx, dtype=torch.bool, device=dev).tril(ctx - q_len)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
        for who, fn in ((f"kvmem[{name}]", kv_fn), ("torch SDPA", sdpa)):
            t = median_time(fn, device=dev, reps=5)
            rows.append(dict(case=label, batch=batch_size, ctx=ctx, q_len=q_len, impl=who, ms=t * 1e3,
                             gbps=b.kv_bytes() / t / 1e9, pct_read_bw=100 * b.kv_bytes() / t / bw,
                             gflops=b.flops(causal) / t / 1e9))
            r = rows[-1]
            print(f"{label:15} B={batch_size:<2} ctx={ctx:<6} q={q_len:<5} {who:16} {r['ms']:9.2f} ms "
                  f"{r['gbps']:7.2f} GB/s {r['pct_read_bw']:6.1f}% of read bw {r['gflops']:8.1f} GFLOP/s")
        del b, q, k, v
    os.makedirs(a.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(a.out, f"paged_attention_{dev.type}_{a.dtype}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(dict(date=stamp, machine=machine, read_bandwidth_gbps=bw / 1e9, dtype=a.dtype,
                       block_size=a.block_size, heads="32/8", head_dim=128, rows=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
