"""The main job (for now): a kernel demo. For decode and prefill on a paged batch it runs every
backend that can run here, prints its agreement with the reference and a timing table next to
torch SDPA on a contiguous copy of the same data.

    python -m kvmem.demo [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--quick]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import kvmem
from kvmem import backends
from kvmem.bench.inputs import paged_batch
from kvmem.bench.timing import median_time, read_bandwidth
from kvmem.ops import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_backend(name, batch):
    old = os.environ.get("KVMEM_BACKEND")
    os.environ["KVMEM_BACKEND"] = name
    try:
        fn = lambda: kvmem.paged_attention(*batch.args(), check=False)  # noqa: E731
        out = fn()
        return out, median_time(fn, device=batch.q.device)
    finally:
        if old is None:
            os.environ.pop("KVMEM_BACKEND")
        else:
            os.environ["KVMEM_BACKEND"] = old


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    a = p.parse_args(argv)
    dtype, dev = DTYPES[a.dtype], torch.device(a.device)
    scale = 1 if a.quick else 2
    print(f"kvmem {kvmem.__version__} | torch {torch.__version__} | device {dev} | dtype {a.dtype} | "
          f"threads {torch.get_num_threads()} | extension: {kvmem.build_info()}")
    bw = read_bandwidth(dev, nbytes=(1 << 29) * scale)
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s\n")
    shapes = [("decode", dict(batch=4 * scale, ctx=1024, q_len=1)),
              ("prefill", dict(batch=1, ctx=512 * scale, q_len=512 * scale))]
    rows = []
    for label, shp in shapes:
        batch = paged_batch(**shp, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype, device=dev)
        ref, _ = reference.paged_attention(*batch.args(), scale=128 ** -0.5)
        causal = shp["q_len"] > 1
        call = backends.Call.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.max_seqlen_q)
        print(f"{label}: {shp}, 32 q / 8 kv heads, d=128, page 16")
        for name, why in backends.explain(call).items():
            print(f"  {name:9} {why}")
            if why.startswith("rejected"):
                continue
            out, t = run_backend(name, batch)
            rows.append((label, name, t, batch, (out.float() - ref.float()).abs().max().item()))
        q, k, v = batch.dense()
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa: E731
        out = sdpa().transpose(1, 2).reshape(ref.shape)
        rows.append((label, "torch SDPA (contiguous)", median_time(sdpa, device=dev), batch,
                     (out.float() - ref.float()).abs().max().item()))
    print(f"\n{'case':8} {'backend':24} {'ms':>9} {'GB/s':>7} {'% read bw':>9} {'GFLOP/s':>8} {'max|out-ref|':>12}")
    for label, name, t, batch, err in rows:
        rate = batch.kv_bytes() / t
        print(f"{label:8} {name:24} {t * 1e3:9.3f} {rate / 1e9:7.2f} {100 * rate / bw:8.1f}% "
              f"{batch.flops(batch.q_len > 1) / t / 1e9:8.1f} {err:12.2e}")
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    bad = [r for r in rows if not r[4] <= tol]
    print("\nagreement with the reference:", "OK" if not bad else f"FAILED for {[r[:2] for r in bad]}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
