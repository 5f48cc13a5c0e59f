"""Paged-attention decode over caches of different dtypes, same run, same data (CPU or GPU).

    python benchmarks/bench_kv_dtype.py [--device cpu] [--batch 8] [--ctx 4096] [--rounds 7]
                                        [--kv-dtypes float32,bfloat16,float8_e4m3fn,float8_e5m2]

One decode batch (32 query / 8 KV heads, d=128, pages of 16, q in --q-dtype) is written once in
fp32; each cache dtype gets the same keys/values encoded into it (float8: per-KV-head scales,
absmax * 1.25 / the format's max; ``kvmem.ops._common.encode``). The implementations are timed in
interleaved rounds with a read-bandwidth sample before each (as bench_paged_attention.py), so the
ratios are of one run on one machine state. Reports ms, the speed-up over the fp32 cache, GB/s of
K/V actually read (the cache's own bytes) and % of the read bandwidth measured beside it.

Issue targets (CPU, B=8 ctx=4096 32/8 d=128): float8 >= 1.3x the fp32 cache and >= 0.95x the
bf16 cache; the script prints whether the medians met them. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import kvmem  # noqa: E402
from kvmem import backends  # noqa: E402
from kvmem.bench import report  # noqa: E402
from kvmem.bench.inputs import paged_batch  # noqa: E402
from kvmem.bench.timing import median_time, read_bandwidth_probe  # noqa: E402
from kvmem.ops._common import encode, is_fp8  # noqa: E402

TARGETS = {"float8_vs_float32": 1.3, "float8_vs_bfloat16": 0.95}


def encoded(cache: torch.Tensor, dtype: torch.dtype):
    """``cache`` (fp32) in ``dtype``: (cache, k_scale or None). NaN slots stay NaN."""
    if not is_fp8(dtype):
        return cache.to(dtype), None
    amax = cache.nan_to_num(0).abs().amax(dim=(0, 1, 3))  # [Hkv]
    scale = (amax * 1.25 / torch.finfo(dtype).max).float()
    return encode(cache / scale.view(1, 1, -1, 1), dtype), scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--q-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-dtypes", default="float32,bfloat16,float8_e4m3fn,float8_e5m2")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    dev, qdt = torch.device(a.device), getattr(torch, a.q_dtype)
    kv_dtypes = [getattr(torch, n) for n in a.kv_dtypes.split(",")]
    machine = report.machine_info(dev)
    print(report.describe_machine(machine))
    probe = read_bandwidth_probe(dev, nbytes=1 << 30)
    base = paged_batch(a.batch, a.ctx, 1, 32, 8, 128, 16, torch.float32, dev)
    q = base.q.to(qdt)
    impls, kv_bytes = [], {}
    for dt in kv_dtypes:
        kc, ks = encoded(base.k_cache, dt)
        vc, vs = encoded(base.v_cache, dt)
        kw = {} if ks is None else dict(k_scale=ks, v_scale=vs)
        args = (q, kc, vc) + base.args()[3:]
        name = str(dt).replace("torch.", "")
        chosen = backends.select(backends.Call.paged_attention(q, kc, vc, 1, k_scale=ks, v_scale=vs)).name
        fn = (lambda args=args, kw=kw: kvmem.paged_attention(*args, check=False, **kw))
        impls.append((f"{name}[{chosen}]", fn))
        kv_bytes[impls[-1][0]] = base.kv_bytes() * dt.itemsize // 4
    print(f"decode B={a.batch} ctx={a.ctx} heads 32/8 d=128 pages 16, q {a.q_dtype}; {a.rounds} interleaved rounds")
    samples = {n: [] for n, _ in impls}
    for r in range(a.rounds):
        for name, fn in impls[r % len(impls):] + impls[: r % len(impls)]:
            bw = probe()
            samples[name].append((median_time(fn, device=dev, warmup=1, reps=a.reps), bw))
    ms = {n: statistics.median(t for t, _ in s) * 1e3 for n, s in samples.items()}
    ref = next(n for n in ms if n.startswith("float32"))
    rows = []
    for name, _ in impls:
        s = samples[name]
        pct = statistics.median(100 * kv_bytes[name] / t / bw for t, bw in s)
        rows.append(dict(impl=name, ms=ms[name], ms_min=min(t for t, _ in s) * 1e3, ms_max=max(t for t, _ in s) * 1e3,
                         speedup_vs_fp32=ms[ref] / ms[name], kv_bytes=kv_bytes[name],
                         gbps=kv_bytes[name] / (ms[name] / 1e3) / 1e9, pct_read_bw=pct,
                         samples=[dict(ms=t * 1e3, read_gbps=bw / 1e9) for t, bw in s]))
        r = rows[-1]
        print(f"  {name:28} {r['ms']:8.2f} ms ({r['ms_min']:.2f}-{r['ms_max']:.2f})  x{r['speedup_vs_fp32']:.2f} vs fp32 "
              f"{r['gbps']:6.2f} GB/s {pct:5.1f}% of read bw")
    targets = {}
    bf = next((n for n in ms if n.startswith("bfloat16")), None)
    for name in ms:
        if name.startswith("float8"):
            targets[name] = dict(vs_fp32=ms[ref] / ms[name], vs_bf16=None if bf is None else ms[bf] / ms[name])
            t = targets[name]
            met = t["vs_fp32"] >= TARGETS["float8_vs_float32"] and (t["vs_bf16"] is None or t["vs_bf16"] >= TARGETS["float8_vs_bfloat16"])
            t["met"] = met
            print(f"target {name}: >= {TARGETS['float8_vs_float32']}x fp32 and >= {TARGETS['float8_vs_bfloat16']}x bf16: "
                  f"{t['vs_fp32']:.2f}x / {t['vs_bf16'] if t['vs_bf16'] is None else round(t['vs_bf16'], 2)}x -> "
                  f"{'MET' if met else 'NOT MET'}")
    if hasattr(os, "getloadavg"):
        machine["load_avg_1m_end"] = os.getloadavg()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(a.out, f"kv_dtype_{dev.type}_q{a.q_dtype}_{stamp}.json")
    report.write_json(path, dict(date=stamp, machine=machine, batch=a.batch, ctx=a.ctx, q_dtype=a.q_dtype,
                                 heads="32/8", head_dim=128, block_size=16, rounds=a.rounds, reps=a.reps,
                                 targets=targets, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
