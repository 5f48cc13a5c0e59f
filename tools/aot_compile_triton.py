#!/usr/bin/env python
"""Compile every kvmem Triton kernel variant ahead of time for real GPUs (no GPU needed).

Every (kernel, dtype, constexprs, num_warps, num_stages) that the launchers or the autotuner can
choose (``kvmem.ops.triton.configs.aot_variants()``) is compiled with ``triton.compile`` for
each target compute capability (default sm80 and sm90). Pointer arguments and the strides that
are multiples of 16 at runtime get the same ``tt.divisibility=16`` hint the JIT would give them,
so the compiled code (software pipelining, vectorisation, shared memory) matches what runs.

Prints shared memory (and registers/stack where ``cuobjdump`` is available) per variant and
exits non-zero if any compile fails or any variant needs more shared memory than the target
allows per block (opt-in maximum: sm80 163 KiB = 166912 B, sm90 227 KiB = 232448 B).

Works with triton 3.6 and 3.9 (same ``ASTSource(fn, signature, constexprs, attrs)`` API:
``signature`` names every argument, constexprs typed ``"constexpr"``).

    python tools/aot_compile_triton.py [--cc 80 90] [--jobs N] [--filter prefill] [--fresh-cache]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# cudaDevAttrMaxSharedMemoryPerBlockOptin (what Triton checks before launching).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# Argument names -> type, per kernel. "T" = the variant's dtype, "S" = the source dtype.
_PTRS = {
    "prefill": dict(q_ptr="T", k_ptr="T", v_ptr="T", out_ptr="T", bt_ptr="i32", seq_lens_ptr="i32",
                    cu_q_ptr="i32", sink_ptr="fp32", lse_ptr="fp32"),
    "decode": dict(q_ptr="T", k_ptr="T", v_ptr="T", out_ptr="T", bt_ptr="i32", seq_lens_ptr="i32",
                   cu_q_ptr="i32", sink_ptr="fp32", lse_ptr="fp32", part_out_ptr="fp32",
                   part_lse_ptr="fp32"),
    "decode_reduce": dict(part_out_ptr="fp32", part_lse_ptr="fp32", cu_q_ptr="i32", sink_ptr="fp32",
                          out_ptr="T", lse_ptr="fp32"),
    "merge_states": dict(out_ptr="T", lse_ptr="fp32", a_ptr="T", lse_a_ptr="fp32", b_ptr="T",
                         lse_b_ptr="fp32"),
    "cache_write": dict(k_ptr="S", v_ptr="S", k_cache_ptr="T", v_cache_ptr="T", slot_ptr="i64"),
}
_FLOATS = {"qk_scale", "softcap_in", "softcap_out"}
# Integer arguments that are multiples of 16 in every supported layout (strides over a head dim
# that is a multiple of 16). Block-table, lse and split-lse strides may be anything.
_DIV16 = re.compile(r"^head_dim$|^stride_(qt|qh|kb|ks|kh|vb|vs|vh|ot|oh|ps|pt|ph|at|ah|bt|bh|kt|vt|kcb|kcs|kch|"
                    r"vcb|vcs|vch)$")


def _kernel_fn(kernel: str):
    pa = importlib.import_module("kvmem.ops.triton.paged_attention")
    if kernel == "prefill":
        return pa._prefill_kernel
    if kernel == "decode":
        return pa._decode_kernel
    if kernel == "decode_reduce":
        return pa._decode_reduce_kernel
    if kernel == "merge_states":
        return importlib.import_module("kvmem.ops.triton.merge_states")._merge_states_kernel
    if kernel == "cache_write":
        return importlib.import_module("kvmem.ops.triton.cache_write")._cache_write_kernel
    raise KeyError(kernel)


def build_source(variant):
    import triton

    fn = _kernel_fn(variant.kernel)
    constexprs = dict(variant.constexprs)
    ptrs = _PTRS[variant.kernel]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ptrs:
            ty = ptrs[name]
            ty = {"T": variant.dtype, "S": variant.src_dtype}.get(ty, ty)
            signature[name] = "*" + ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            # (merge_states' stride_bt/stride_bh are out_b's; prefill/decode's stride_bt is the
            # block table's row stride, which may be anything)
            if _DIV16.match(name) and not (variant.kernel in ("prefill", "decode") and name == "stride_bt"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise KeyError(f"{variant.kernel}: unknown constexprs {sorted(missing)}")
    return triton.compiler.ASTSource(fn, signature, constexprs, attrs)


def _cuobjdump() -> str:
    import triton

    try:
        from triton import knobs  # triton >= 3.4

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes):
    """(registers, stack bytes) from ``cuobjdump -res-usage``, or (None, None)."""
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                 timeout=60)
        m = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
        return (int(m.group(1)), int(m.group(2))) if m else (None, None)
    except Exception:
        return None, None


def compile_one(job):
    variant, cc = job
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    try:
        src = build_source(variant)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        shared = int(compiled.metadata.shared)
        regs, stack = _resources(compiled.asm["cubin"])
        return dict(name=variant.name, kernel=variant.kernel, cc=cc, shared=shared, regs=regs, stack=stack,
                    seconds=time.time() - t0, error=None)
    except Exception as e:  # report, do not stop the other jobs
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return dict(name=variant.name, kernel=variant.kernel, cc=cc, shared=None, regs=None, stack=None,
                    seconds=time.time() - t0, error=" | ".join(msg[-6:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default="", help="only variants whose name contains this")
    ap.add_argument("--fresh-cache", action="store_true", help="compile into an empty Triton cache")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice
    os.environ.pop("TRITON_INTERPRET", None)
    if args.fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvmem_aot_cache_")
    import triton

    from kvmem.ops.triton import configs

    for cc in args.cc:
        if cc not in SMEM_LIMIT:
            ap.error(f"unknown shared-memory limit for cc {cc}")
    jobs = [(v, cc) for cc in args.cc for v in configs.aot_variants(90 if cc >= 90 else 80)
            if args.filter in v.name]
    print(f"triton {triton.__version__}: {len(jobs)} compiles for sm{', sm'.join(map(str, args.cc))}, "
          f"{args.jobs} jobs", flush=True)
    t0 = time.time()
    results = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for r in pool.map(compile_one, jobs, chunksize=1):
                results.append(r)
                _print(r, args, len(results), len(jobs))
    else:
        for job in jobs:
            r = compile_one(job)
            results.append(r)
            _print(r, args, len(results), len(jobs))

    failed = [r for r in results if r["error"]]
    too_big = [r for r in results if r["shared"] is not None and r["shared"] > SMEM_LIMIT[r["cc"]]]
    print(f"\n== summary (triton {triton.__version__}, {time.time() - t0:.0f}s) ==")
    for cc in args.cc:
        rs = [r for r in results if r["cc"] == cc and not r["error"]]
        if not rs:
            continue
        top = max(rs, key=lambda r: r["shared"])
        spills = [r for r in rs if r["stack"]]
        print(f"sm{cc}: {len(rs)} compiled, max shared {top['shared']} B (limit {SMEM_LIMIT[cc]}) in "
              f"{top['name']}; {len(spills)} use a local-memory stack (max "
              f"{max([r['stack'] for r in spills] + [0])} B)")
        for kernel in sorted({r["kernel"] for r in rs}):
            kr = [r for r in rs if r["kernel"] == kernel]
            regs = [r["regs"] for r in kr if r["regs"] is not None]
            print(f"  {kernel:14s} {len(kr):4d} variants, max shared {max(r['shared'] for r in kr):6d} B"
                  + (f", max regs {max(regs)}" if regs else ""))
    for r in too_big:
        print(f"SHARED MEMORY OVER LIMIT sm{r['cc']}: {r['name']}: {r['shared']} > {SMEM_LIMIT[r['cc']]}")
    for r in failed:
        print(f"COMPILE FAILED sm{r['cc']}: {r['name']}: {r['error']}")
    ok = not failed and not too_big
    print("OK" if ok else f"FAILED: {len(failed)} compile errors, {len(too_big)} over the shared-memory limit")
    return 0 if ok else 1


def _print(r, args, i, n):
    if r["error"]:
        print(f"[{i}/{n}] sm{r['cc']} {r['name']}: ERROR {r['error']}", flush=True)
    elif not args.quiet:
        extra = f" regs {r['regs']} stack {r['stack']}" if r["regs"] is not None else ""
        flag = " OVER LIMIT" if r["shared"] > SMEM_LIMIT[r["cc"]] else ""
        print(f"[{i}/{n}] sm{r['cc']} {r['name']}: shared {r['shared']} B{extra} "
              f"({r['seconds']:.1f}s){flag}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
