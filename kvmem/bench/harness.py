"""``python -m kvmem.bench``: kvmem's paged attention against its peers on the same tensors.

    python -m kvmem.bench decode  [--batch 8 32] [--context 4096] [--quick] [--device cpu] ...
    python -m kvmem.bench prefill [--context 512 1024] [--q-len 256] ...
    python -m kvmem.bench generate [--prompts 1024 4096] [--batch 1 8] ...   (kvmem.bench.generate)
    python -m kvmem.bench memory                 (not available yet)

A run first measures this device's limits (copy bandwidth; read bandwidth on CPU; a dense
matmul rate), then for each case times every kvmem backend that ``backends.explain`` says can
run it (each forced via ``KVMEM_BACKEND``) and every peer it can import (torch SDPA per SDPA
backend and FlexAttention on a contiguous copy; ``flex[paged]``: FlexAttention directly on
kvmem's pages through a BlockMask built from the block table; FlashInfer and flash-attn when
installed). FlexAttention is compiled except in ``--quick`` CPU runs (``flex[eager]``,
``flex[paged,eager]``).
Each output is compared once with kvmem's reference (``WRONG`` beyond 5e-2 for bf16/fp16,
1e-3 for fp32). It prints a table and writes JSON and a PNG plot under ``--out``.
Exit status: 0, or 1 when a kvmem backend was WRONG.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from kvmem import backends
from kvmem.bench import peers, report
from kvmem.bench.inputs import PagedBatch, paged_batch
from kvmem.bench.timing import copy_bandwidth, matmul_rate, median_time, read_bandwidth
from kvmem.ops import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
MODES = ("decode", "prefill")
NOT_YET = {
    "memory": "not available yet: arrives with the memory bank issue",
}

# (batch, ctx, q_len) per mode and device type; q_len None means q_len = ctx (a full prefill).
SWEEPS = {
    ("decode", "cuda"): [(1, 131072, 1), (8, 32768, 1), (32, 8192, 1), (128, 2048, 1)],
    ("decode", "cpu"): [(1, 16384, 1), (8, 4096, 1), (32, 1024, 1)],
    ("prefill", "cuda"): [(1, n, None) for n in (4096, 8192, 16384, 32768)],
    ("prefill", "cpu"): [(1, n, None) for n in (512, 1024, 2048)],
}
QUICK = {"decode": [(1, 256, 1), (4, 512, 1)], "prefill": [(1, 128, None), (2, 256, None)]}
# One case per axis when only --batch or only --context is given.
DEFAULT_BATCH = {"decode": 8, "prefill": 1}
DEFAULT_CONTEXT = {("decode", "cuda"): 32768, ("decode", "cpu"): 4096,
                   ("prefill", "cuda"): 8192, ("prefill", "cpu"): 1024}


def cases(mode: str, device_type: str, quick: bool = False, batch: Optional[Sequence[int]] = None,
          context: Optional[Sequence[int]] = None, q_len: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """The ``(batch, ctx, q_len)`` sweep of one run.

    Parameters
    ----------
    mode : {'decode', 'prefill'}
    device_type : {'cpu', 'cuda'}
    quick : bool
        A couple of tiny cases (CI).
    batch, context : sequence of int, optional
        When either is given the sweep is their product (the other from ``DEFAULT_*``).
    q_len : int, optional
        Prefill query length per sequence (default: the context, a full prefill). Decode: 1.

    Returns
    -------
    list of (batch, ctx, q_len)
    """
    dev = "cuda" if device_type == "cuda" else "cpu"
    if batch or context:
        pairs = itertools.product(batch or [DEFAULT_BATCH[mode]], context or [DEFAULT_CONTEXT[mode, dev]])
        raw = [(b, c, 1 if mode == "decode" else None) for b, c in pairs]
    else:
        raw = QUICK[mode] if quick else SWEEPS[mode, dev]
    out = []
    for b, c, q in raw:
        if mode == "prefill":
            q = min(q_len, c) if q_len else c
        out.append((b, c, q))
    return out


def measure_limits(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Copy bandwidth (and read bandwidth on CPU) in GB/s and the matmul rate in TFLOP/s.

    The matmul runs in the benchmark dtype (so bf16 on GPU and fp32 on CPU with the defaults).
    Decode is compared with the read bandwidth on CPU and the copy bandwidth on GPU; prefill
    with the matmul rate.
    """
    gpu = device.type == "cuda"
    nbytes = 1 << (26 if quick else (31 if gpu else 30))
    limits = {"copy_gbps": copy_bandwidth(device, nbytes) / 1e9, "read_gbps": None}
    if not gpu:
        limits["read_gbps"] = read_bandwidth(device, nbytes) / 1e9
    n = (1024 if gpu else 512) if quick else (8192 if gpu else 2048)
    limits.update(matmul_tflops=matmul_rate(device, dtype, n) / 1e12, matmul_dtype=str(dtype).replace("torch.", ""),
                  matmul_n=n, buffer_bytes=nbytes, decode_limit="copy_gbps" if gpu else "read_gbps",
                  prefill_limit="matmul_tflops")
    return limits


def reference_output(b: PagedBatch, causal: bool = True, max_bytes: int = 1 << 28) -> torch.Tensor:
    """kvmem's reference output ``[B * q_len, Hq, D]``, computed in query chunks so that the
    reference's score matrix stays under about ``max_bytes`` (bottom-right causal alignment
    makes a chunk of queries a chunked-prefill call with a shorter ``seq_lens``)."""
    hq, d = b.q.shape[1:]
    rows = max(1, min(b.q_len, max_bytes // (hq * b.ctx * 12)))
    qv = b.q.view(b.batch, b.q_len, hq, d)
    dev = b.q.device
    outs = []
    for s in range(0, b.q_len, rows):
        e = min(b.q_len, s + rows)
        kv_len = b.ctx - b.q_len + e if causal else b.ctx
        cu = torch.arange(b.batch + 1, dtype=torch.int32, device=dev) * (e - s)
        lens = torch.full((b.batch,), kv_len, dtype=torch.int32, device=dev)
        o, _ = reference.paged_attention(qv[:, s:e].reshape(-1, hq, d), b.k_cache, b.v_cache, b.block_table,
                                         lens, cu, e - s, kv_len, scale=d ** -0.5, causal=causal)
        outs.append(o.view(b.batch, e - s, hq, d))
    return torch.cat(outs, 1).reshape(-1, hq, d)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # a declared dependency; degrade to plain prints if it is missing
        class _Bar:
            def __init__(self):
                print("(tqdm not installed: pip install tqdm for a progress bar)")

            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

            @staticmethod
            def write(s):
                print(s)

        return _Bar()
    return tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True, file=sys.stderr)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(b: PagedBatch, mode: str, a: argparse.Namespace, limits: dict, bar) -> Tuple[List[dict], list]:
    """Time every implementation on one batch; return its rows and its skipped entries."""
    dev, dtype = b.q.device, b.q.dtype
    label = f"B={b.batch} ctx={b.ctx}" + ("" if mode == "decode" else f" q={b.q_len}")
    ref = reference_output(b, max_bytes=1 << (32 if dev.type == "cuda" else 28)).float()
    only = [n.strip() for n in a.backends.split(",")] if a.backends else None
    impls, skipped = peers.kvmem_impls(b, include_reference=a.include_reference, only=only)
    found, skip = peers.peer_impls(b, flex_compile=dev.type == "cuda" or not a.quick)
    impls += found
    skipped += skip
    rows = []
    for impl in impls:
        bar.set_postfix_str(f"{label} {impl.name}")
        try:
            with impl.context():
                out = impl.fn()  # first call: compiles what needs compiling; checked once
                diff = (impl.tokens(out).float() - ref).abs().max().item()
                del out
                t0 = time.perf_counter()
                impl.fn()
                _sync(dev)
                # fewer reps for --quick (CI) and for slow CPU cases
                slow = dev.type == "cpu" and time.perf_counter() - t0 > 0.5
                t = median_time(impl.fn, device=dev, warmup=0 if slow else 1, reps=3 if slow or a.quick else 7)
        except Exception as e:  # noqa: BLE001 - a peer that fails is skipped with its reason
            skipped.append((impl.name, peers.first_line(e)))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        ok = diff <= TOLERANCE[dtype]  # False for NaN too
        rows.append(dict(case=label, batch=b.batch, ctx=b.ctx, q_len=b.q_len, impl=impl.name, kvmem=impl.kvmem,
                         note=impl.note, ms=t * 1e3, gbps=b.kv_bytes() / t / 1e9, tflops=b.flops(True) / t / 1e12,
                         max_diff=diff, status="OK" if ok else "WRONG"))
    peer_ms = [r["ms"] for r in rows if not r["kvmem"] and r["status"] == "OK"]
    limit = limits[limits["decode_limit" if mode == "decode" else "prefill_limit"]]
    for r in rows:
        value = r["gbps"] if mode == "decode" else r["tflops"]
        r["pct"] = 100.0 * value / limit if limit else None
        r["ratio"] = min(peer_ms) / r["ms"] if peer_ms else None
    bar.update()
    return rows, [dict(case=label, impl=n, reason=w) for n, w in skipped]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m kvmem.bench`` argument parser (subcommands share the options)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("shape and run options")
    g.add_argument("--batch", type=_positive, nargs="+", metavar="B",
                   help="batch sizes (the sweep is their product with --context)")
    g.add_argument("--context", type=_positive, nargs="+", metavar="N", help="KV lengths per sequence")
    g.add_argument("--q-len", type=_positive, help="prefill: queries per sequence (default and cap: the context)")
    g.add_argument("--heads", type=_positive, default=32, help="query heads (default 32)")
    g.add_argument("--kv-heads", type=_positive, default=8, help="KV heads (default 8)")
    g.add_argument("--head-dim", type=_positive, default=128, help="head dim (default 128)")
    g.add_argument("--page-size", type=_positive, default=16, help="tokens per page (default 16)")
    g.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    g.add_argument("--quick", action="store_true", help="a couple of tiny cases (CI)")
    g.add_argument("--out", default=os.path.join("benchmarks", "results"), metavar="DIR",
                   help="where JSON and PNG go (default benchmarks/results)")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")
    g.add_argument("--include-reference", action="store_true", help="also time kvmem's reference backend")
    g.add_argument("--backends", metavar="A,B", help="force exactly these kvmem backends (e.g. cuda,triton), "
                                                     "even ones the dispatcher would not pick")
    p = argparse.ArgumentParser(prog="python -m kvmem.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{decode,prefill,generate,memory}")
    helps = {"decode": "one query per sequence: GB/s of K/V read", "prefill": "causal prefill: TFLOP/s",
             "generate": "HF generate(): default vs kvmem (see python -m kvmem.bench generate -h)", **NOT_YET}
    p.subcommands = {name: sub.add_parser(name, parents=[common], help=text, description=text)
                     for name, text in helps.items()}
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> torch.device:
    try:
        dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {dev}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu)")
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    if a.backends:
        bad = [n for n in a.backends.split(",") if n.strip() not in backends.BY_NAME]
        if bad:
            p.error(f"--backends: unknown {bad}; choose from {', '.join(backends.BY_NAME)}")
    if a.command == "decode" and a.q_len not in (None, 1):
        p.error("--q-len is for prefill (decode has one query per sequence)")
    return dev


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m kvmem.bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:  # its own options (model, prompts, new tokens): its own parser
        from kvmem.bench import generate

        return generate.main(argv[1:])
    p = build_parser()
    a = p.parse_args(argv)
    if a.command in NOT_YET:
        print(NOT_YET[a.command])
        return 0
    dev = _check_args(p.subcommands[a.command], a)
    dtype = DTYPES[a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    mode = a.command
    machine = report.machine_info(dev)
    print(report.describe_machine(machine))
    limits = measure_limits(dev, dtype, a.quick)
    read = f"read {limits['read_gbps']:.1f} GB/s, " if limits["read_gbps"] else ""
    print(f"measured limits: {read}copy {limits['copy_gbps']:.1f} GB/s, {limits['matmul_dtype']} matmul "
          f"{limits['matmul_tflops']:.3f} TFLOP/s (n={limits['matmul_n']})")
    sweep = cases(mode, dev.type, a.quick, a.batch, a.context, a.q_len)
    print(f"{mode}: {len(sweep)} case(s), heads {a.heads}/{a.kv_heads}, head dim {a.head_dim}, "
          f"page {a.page_size}, {str(dtype).replace('torch.', '')}, causal")
    rows, skipped = [], []
    bar = _progress(len(sweep), mode)
    try:
        for batch, ctx, q_len in sweep:
            b = paged_batch(batch, ctx, q_len, a.heads, a.kv_heads, a.head_dim, a.page_size, dtype, dev)
            r, s = run_case(b, mode, a, limits, bar)
            rows += r
            skipped += s
            del b
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU numbers: keep the evidence
        machine["load_avg_1m_end"] = os.getloadavg()[0]
    limit_name = limits["decode_limit" if mode == "decode" else "prefill_limit"].replace("_gbps", " bw").replace(
        "_tflops", "")
    print()
    print(report.format_skipped(skipped))
    print(report.format_table(rows, mode, limit_name))
    print(f"\nx best peer = fastest correct peer's time / this time (>1: faster than every peer); "
          f"% of the {limit_name} measured above; check: max|out - reference| <= {TOLERANCE[dtype]:g}")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    stem = os.path.join(a.out, f"{mode}_{dev.type}_{str(dtype).replace('torch.', '')}_{stamp:%Y%m%dT%H%M%SZ}")
    payload = dict(mode=mode, date=stamp.isoformat(timespec="seconds"), machine=machine, limits=limits,
                   config=dict(device=str(dev), dtype=str(dtype).replace("torch.", ""), heads=a.heads,
                               kv_heads=a.kv_heads, head_dim=a.head_dim, page_size=a.page_size, quick=a.quick,
                               causal=True, tolerance=TOLERANCE[dtype], cases=sweep),
                   rows=rows, skipped=skipped)
    report.write_json(stem + ".json", payload)
    print(f"wrote {stem}.json")
    if not a.no_plot:
        why = report.plot(stem + ".png", payload) if rows else "no rows to plot"
        print(f"wrote {stem}.png" if why is None else f"no plot: {why}")
    wrong = [r for r in rows if r["kvmem"] and r["status"] == "WRONG"]
    return 1 if wrong else 0
