#!/usr/bin/env python
"""Compile every kvmem Triton kernel variant ahead of time for real GPUs (no GPU needed).

Every (kernel, dtype, constexprs, num_warps, num_stages) that the launchers or the autotuner can
choose (every op's ``kvmem/ops/<op>/triton.py`` ``aot_variants()``, gathered by
``kvmem.ops.triton_aot.aot_variants``) is compiled with ``triton.compile`` for
each target compute capability (default sm80 and sm90), with the argument specialisation the
JIT gives the same launch through the public ops, so the compiled code (software pipelining,
vectorisation, shared memory) matches what runs:

* the JIT turns an int argument equal to 1 into a constant and marks ints that are multiples of
  16 (``tt.divisibility=16``). Every int argument of the kernels is therefore either listed in
  the kernel's ``do_not_specialize`` (sizes, flags, and the strides that may be 1 or any value:
  block-table rows, lse, split lse) and compiled plain here, or is a stride over head_dim-sized
  rows / head_dim itself, a multiple of 16 for every supported head dim, and marked here. An int
  argument in neither group is an error (:func:`build_source`), so the two cannot drift apart;
  tests/ops/test_paged_attention_gpu.py checks real launches against :func:`build_source` on CPU;
* pointers get the /16 hint (torch allocations are 16-byte aligned; the ops pass whole tensors
  or head-slices of them);
* the slot mapping of cache_write is int64 (what the public op passes).

Prints shared memory (and registers/stack where ``cuobjdump`` is available) per variant and
exits non-zero if any compile fails or any variant needs more shared memory than allowed per
block (the opt-in maximum, what Triton checks before launching) on *any* GPU that uses that
config family: the sm80 family (``configs.arch_of``) also runs on sm86/sm89/sm120 (99 KiB =
101376 B), so its variants are held to 101376 B, not the A100's 163 KiB; the sm90 family (sm90,
sm100) to 227 KiB = 232448 B.

Works with triton 3.6 and 3.9 (same ``ASTSource(fn, signature, constexprs, attrs)`` API:
``signature`` names every argument, constexprs typed ``"constexpr"``).

    python tools/aot_compile_triton.py [--cc 80 90] [--jobs N] [--filter prefill] [--fresh-cache]
"""

from __future__ import annotations

import argparse
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

# cudaDevAttrMaxSharedMemoryPerBlockOptin (what Triton checks before launching), per compute
# capability, and the capabilities that use each config family (kvmem.ops.paged_attention.configs.arch_of).
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
              120: 101376, 121: 101376}


def family_limit(cc: int) -> int:
    """The smallest shared-memory limit among the GPUs that run the config family of ``cc``."""
    from kvmem.ops.paged_attention import configs

    fam = configs.family_of_cc(cc)
    return min(v for k, v in SMEM_LIMIT.items() if configs.family_of_cc(k) == fam)

# Argument names -> type, per kernel. "T" = the variant's dtype, "S" = the source dtype, "C" = the
# caches' dtype (the variant's cache_dtype, else its dtype). Float8 caches are uint8 pointers.
_PTRS = {
    "prefill": dict(q_ptr="T", k_ptr="C", v_ptr="C", out_ptr="T", bt_ptr="i32", seq_lens_ptr="i32",
                    cu_q_ptr="i32", sink_ptr="fp32", rope_ptr="fp32", k_scale_ptr="fp32", v_scale_ptr="fp32",
                    lse_ptr="fp32"),
    "decode": dict(q_ptr="T", k_ptr="C", v_ptr="C", out_ptr="T", bt_ptr="i32", seq_lens_ptr="i32",
                   cu_q_ptr="i32", sink_ptr="fp32", rope_ptr="fp32", k_scale_ptr="fp32", v_scale_ptr="fp32",
                   lse_ptr="fp32", part_out_ptr="fp32", part_lse_ptr="fp32"),
    "decode_reduce": dict(part_out_ptr="fp32", part_lse_ptr="fp32", cu_q_ptr="i32", sink_ptr="fp32",
                          out_ptr="T", lse_ptr="fp32"),
    "merge_states": dict(out_ptr="T", lse_ptr="fp32", a_ptr="T", lse_a_ptr="fp32", b_ptr="T",
                         lse_b_ptr="fp32"),
    "cache_write": dict(k_ptr="S", v_ptr="S", k_cache_ptr="T", v_cache_ptr="T", slot_ptr="i64", k_scale_ptr="fp32",
                        v_scale_ptr="fp32"),
    "memory_select_scores": dict(scores_ptr="fp32", q_ptr="T", summaries_ptr="fp32", bank_ptr="i32",
                                 bank_lens_ptr="i32", query_index_ptr="i32"),
}
_FLOATS = {"qk_scale", "softcap_in", "softcap_out"}
_STORAGE = {"e4m3": "u8", "e5m2": "u8"}  # AotVariant dtype names of float8 caches -> pointer element type
# Integer arguments that are multiples of 16 in every supported layout (strides over a head dim
# that is a multiple of 16). Block-table, lse and split-lse strides may be anything.
_DIV16 = re.compile(r"^head_dim$|^stride_(qt|qh|kb|ks|kh|vb|vs|vh|ot|oh|ps|pt|ph|at|ah|bt|bh|kt|vt|kcb|kcs|kch|"
                    r"vcb|vcs|vch)$")


def _kernel_fn(kernel: str):
    from kvmem.ops import triton_aot

    return triton_aot.aot_kernels()[kernel]


def do_not_specialize(fn) -> set:
    """Names of ``fn``'s arguments the JIT does not value-specialise (JIT or interpreted kernel)."""
    dns = getattr(fn, "do_not_specialize", None)
    if dns is None:  # triton's InterpretedFunction keeps the decorator's kwargs
        dns = getattr(fn, "kwargs", {}).get("do_not_specialize", None) or []
    return {fn.arg_names[d] if isinstance(d, int) else d for d in dns}


def signature_and_attrs(kernel: str, fn, constexprs: dict, dtype: str, src_dtype=None, cache_dtype=None):
    """(signature, attrs) of ``kernel`` as the JIT specialises a launch through the public ops."""
    ptrs = _PTRS[kernel]
    dns = do_not_specialize(fn)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ptrs:
            ty = ptrs[name]
            ty = {"T": dtype, "S": src_dtype, "C": cache_dtype or dtype}.get(ty, ty)
            signature[name] = "*" + _STORAGE.get(ty, ty)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name in dns:
            signature[name] = "i32"  # never value-specialised: plain
        elif _DIV16.match(name) and not (kernel in ("prefill", "decode") and name == "stride_bt"):
            # (merge_states' stride_bt/stride_bh are out_b's; prefill/decode's stride_bt is the
            # block table's row stride, which may be anything and must be in do_not_specialize)
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{kernel}: int argument {name!r} is neither in the kernel's do_not_specialize nor "
                             "a stride that is always a multiple of 16: the JIT would specialise it (to a "
                             "constant when 1, /16 when a multiple of 16) and the AOT variant would differ")
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise KeyError(f"{kernel}: unknown constexprs {sorted(missing)}")
    return signature, attrs


def build_source(variant):
    import triton

    fn = _kernel_fn(variant.kernel)
    constexprs = dict(variant.constexprs)
    signature, attrs = signature_and_attrs(variant.kernel, fn, constexprs, variant.dtype, variant.src_dtype,
                                           variant.cache_dtype)
    return triton.compiler.ASTSource(fn, signature, constexprs, attrs)


_TORCH_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32", "int64": "i64",
                "uint8": "u8"}


def jit_specialization(fn, args) -> tuple:
    """(signature, divisible-by-16 argument indices) that the JIT derives from a launch's
    positional ``args`` (tensors, ints, floats) of kernel ``fn``, constexprs excluded. Uses
    triton's own specialisation function (triton 3.6 and 3.9)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit as _jit

    dns = do_not_specialize(fn)
    signature, div16 = {}, set()
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if hasattr(value, "data_ptr"):  # a tensor
            signature[name] = "*" + _TORCH_TYPES[str(value.dtype).replace("torch.", "")]
            if value.data_ptr() % 16 == 0:
                div16.add(i)
            continue
        ty, key = _jit.native_specialize_impl(BaseBackend, value, False, name not in dns, True)[:2]
        signature[name] = ty
        if key == "D":
            div16.add(i)
    return signature, div16


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

    from kvmem.ops import triton_aot
    from kvmem.ops.paged_attention import configs

    for cc in args.cc:
        if cc not in SMEM_LIMIT:
            ap.error(f"unknown shared-memory limit for cc {cc}")
    limits = {cc: family_limit(cc) for cc in args.cc}
    jobs = [(v, cc) for cc in args.cc for v in triton_aot.aot_variants(configs.family_of_cc(cc))
            if args.filter in v.name]
    print(f"triton {triton.__version__}: {len(jobs)} compiles for sm{', sm'.join(map(str, args.cc))}, "
          f"{args.jobs} jobs", flush=True)
    t0 = time.time()
    results = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for r in pool.map(compile_one, jobs, chunksize=1):
                results.append(r)
                _print(r, args, len(results), len(jobs), limits)
    else:
        for job in jobs:
            r = compile_one(job)
            results.append(r)
            _print(r, args, len(results), len(jobs), limits)

    failed = [r for r in results if r["error"]]
    too_big = [r for r in results if r["shared"] is not None and r["shared"] > limits[r["cc"]]]
    print(f"\n== summary (triton {triton.__version__}, {time.time() - t0:.0f}s) ==")
    for cc in args.cc:
        rs = [r for r in results if r["cc"] == cc and not r["error"]]
        if not rs:
            continue
        top = max(rs, key=lambda r: r["shared"])
        spills = [r for r in rs if r["stack"]]
        users = ", ".join(f"sm{k}" for k in SMEM_LIMIT if configs.family_of_cc(k) == configs.family_of_cc(cc))
        print(f"sm{cc}: {len(rs)} compiled, max shared {top['shared']} B (limit {limits[cc]}: the smallest of "
              f"{users}, which run these configs) in "
              f"{top['name']}; {len(spills)} use a local-memory stack (max "
              f"{max([r['stack'] for r in spills] + [0])} B)")
        for kernel in sorted({r["kernel"] for r in rs}):
            kr = [r for r in rs if r["kernel"] == kernel]
            regs = [r["regs"] for r in kr if r["regs"] is not None]
            print(f"  {kernel:14s} {len(kr):4d} variants, max shared {max(r['shared'] for r in kr):6d} B"
                  + (f", max regs {max(regs)}" if regs else ""))
    for r in too_big:
        print(f"SHARED MEMORY OVER LIMIT sm{r['cc']} family: {r['name']}: {r['shared']} > {limits[r['cc']]}")
    for r in failed:
        print(f"COMPILE FAILED sm{r['cc']}: {r['name']}: {r['error']}")
    ok = not failed and not too_big
    print("OK" if ok else f"FAILED: {len(failed)} compile errors, {len(too_big)} over the shared-memory limit")
    return 0 if ok else 1


def _print(r, args, i, n, limits):
    if r["error"]:
        print(f"[{i}/{n}] sm{r['cc']} {r['name']}: ERROR {r['error']}", flush=True)
    elif not args.quiet:
        extra = f" regs {r['regs']} stack {r['stack']}" if r["regs"] is not None else ""
        flag = " OVER LIMIT" if r["shared"] > limits[r["cc"]] else ""
        print(f"[{i}/{n}] sm{r['cc']} {r['name']}: shared {r['shared']} B{extra} "
              f"({r['seconds']:.1f}s){flag}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
