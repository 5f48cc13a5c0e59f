"""paged_attention on the Triton backend: its kernels vs the fp32 reference (``kvmem.ops.reference``),
under the Triton interpreter (the problems: triton_problems.py; cache_write's and merge_states'
Triton kernels: test_cache_write.py, test_merge_states.py).

Shapes are tiny so the whole module runs in a few minutes on a CPU. Every case poisons what the
kernels must not touch: unused slots of referenced pages hold NaN, block-table entries outside
the pages holding visible keys are -1 or point at an all-NaN page, and outputs are NaN before
the call. ``test_gpu_full_product`` (marked ``gpu``) re-runs a large product compiled on a real
GPU, in a subprocess without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

import backends  # noqa: F401  (first: TRITON_INTERPRET=1 where there is no GPU, before triton is imported)
from kvmem.dispatch import Call, capability
from triton_problems import (BF16, F16, F32, args_of, build, cfgs, check, gpu_full_product, pa,
                             poisoned_outputs)


@pytest.fixture(autouse=True)
def _interpreter_tests_need_the_interpreter(request):
    if "gpu" not in request.keywords and not cfgs.interpreting():
        pytest.skip("Triton interpreter test (CPU tensors): run with TRITON_INTERPRET=1 "
                    "(set automatically where CUDA is unavailable)")


# ---------------------------------------------------------------------------------------------
# paged_attention through the public entry point (dispatches prefill / decode)
# ---------------------------------------------------------------------------------------------

# (id, q_lens, kv_lens, dict(D, bs, Hkv, G, dtype, ...)); pairwise-chosen over page size, GQA
# group, head dim, dtype, prefix / no prefix, decode / mixed, window / softcap / sink, table
# poisoning (-1 or an all-NaN page), and cache / q / out layouts.
CASES = [
    # prefill, no cached prefix
    ("pf-f32-d64-bs16-g1", [5, 37], [5, 37], dict(D=64, bs=16, Hkv=2, G=1, dtype=F32)),
    ("pf-f16-d80-bs8-g3", [19, 6], [19, 6], dict(D=80, bs=8, Hkv=1, G=3, dtype=F16, table="neg1")),
    ("pf-bf16-d96-bs32-g4", [40], [40], dict(D=96, bs=32, Hkv=1, G=4, dtype=BF16)),
    ("pf-f32-d112-bs1-g7", [11, 3], [11, 3], dict(D=112, bs=1, Hkv=1, G=7, dtype=F32)),
    ("pf-f16-d256-bs128-g8", [21], [21], dict(D=256, bs=128, Hkv=1, G=8, dtype=F16)),
    ("pf-bf16-d128-bs16-g1-long", [70], [70], dict(D=128, bs=16, Hkv=1, G=1, dtype=BF16)),
    # prefill with a cached prefix (chunked prefill)
    ("pfx-f32-d128-bs8-g3", [9, 20], [30, 25], dict(D=128, bs=8, Hkv=1, G=3, dtype=F32)),
    ("pfx-bf16-d64-bs1-g8", [13], [40], dict(D=64, bs=1, Hkv=1, G=8, dtype=BF16, table="neg1")),
    ("pfx-f16-d96-bs16-g7", [17, 2], [50, 33], dict(D=96, bs=16, Hkv=1, G=7, dtype=F16)),
    ("pfx-f32-d256-bs32-g4", [12], [75], dict(D=256, bs=32, Hkv=1, G=4, dtype=F32)),
    ("pfx-f16-d112-bs128-g1", [66, 5], [150, 5], dict(D=112, bs=128, Hkv=2, G=1, dtype=F16)),
    ("pfx-bf16-d80-bs256-g3", [24], [290], dict(D=80, bs=256, Hkv=1, G=3, dtype=BF16)),
    # sliding window (pages before the window are unmapped)
    ("win-f16-d64-bs8-g4", [30], [30], dict(D=64, bs=8, Hkv=1, G=4, dtype=F16, window=7)),
    ("win-f32-d80-bs1-g1-pfx", [10, 4], [45, 20], dict(D=80, bs=1, Hkv=2, G=1, dtype=F32, window=9,
                                                        table="neg1")),
    ("win-bf16-d128-bs16-g3-pfx", [35], [100], dict(D=128, bs=16, Hkv=1, G=3, dtype=BF16, window=20)),
    ("win-f32-d64-bs32-g7-noncausal", [12], [60], dict(D=64, bs=32, Hkv=1, G=7, dtype=F32, window=16,
                                                      causal=False)),
    ("win1-f16-d96-bs8-g8", [9], [25], dict(D=96, bs=8, Hkv=1, G=8, dtype=F16, window=1)),
    # softcap / sink / everything
    ("cap-bf16-d80-bs32-g3", [18], [40], dict(D=80, bs=32, Hkv=1, G=3, dtype=BF16, softcap=2.0)),
    ("cap-f32-d256-bs8-g1", [7, 9], [7, 30], dict(D=256, bs=8, Hkv=2, G=1, dtype=F32, softcap=5.0)),
    ("sink-f32-d112-bs8-g7", [10], [26], dict(D=112, bs=8, Hkv=1, G=7, dtype=F32, sink=True)),
    ("sink-f16-d64-bs128-g4", [15, 1], [15, 60], dict(D=64, bs=128, Hkv=1, G=4, dtype=F16, sink=True)),
    ("all-f16-d96-bs1-g8", [14], [40], dict(D=96, bs=1, Hkv=1, G=8, dtype=F16, window=6, softcap=3.0,
                                             sink=True)),
    ("all-bf16-d128-bs16-g1", [33, 20], [70, 20], dict(D=128, bs=16, Hkv=2, G=1, dtype=BF16, window=10,
                                                        softcap=4.0, sink=True, table="neg1")),
    ("noncausal-f32-d128-bs16-g3", [6, 11], [20, 11], dict(D=128, bs=16, Hkv=1, G=3, dtype=F32,
                                                           causal=False, sink=True)),
    # decode (max_seqlen_q == 1): split-K with the heuristic split count
    ("dec-f32-d64-bs16-g1", [1, 1, 1], [5, 40, 129], dict(D=64, bs=16, Hkv=2, G=1, dtype=F32)),
    ("dec-f16-d128-bs1-g8", [1, 1], [17, 3], dict(D=128, bs=1, Hkv=1, G=8, dtype=F16)),
    ("dec-bf16-d80-bs8-g3", [1], [300], dict(D=80, bs=8, Hkv=2, G=3, dtype=BF16, table="neg1")),
    ("dec-f16-d256-bs32-g7", [1, 1], [100, 64], dict(D=256, bs=32, Hkv=1, G=7, dtype=F16)),
    ("dec-f32-d112-bs128-g4", [1], [257], dict(D=112, bs=128, Hkv=1, G=4, dtype=F32, sink=True)),
    ("dec-bf16-d96-bs256-g1", [1, 1], [600, 20], dict(D=96, bs=256, Hkv=3, G=1, dtype=BF16)),
    ("dec-win-f16-d64-bs8-g4", [1, 1], [90, 5], dict(D=64, bs=8, Hkv=1, G=4, dtype=F16, window=24)),
    ("dec-cap-sink-f32-d80-bs16-g3", [1], [70], dict(D=80, bs=16, Hkv=1, G=3, dtype=F32, softcap=2.0,
                                                     sink=True, window=30)),
    ("dec-g16-bf16-d128-bs16", [1], [40], dict(D=128, bs=16, Hkv=1, G=16, dtype=BF16)),
    ("dec-g24-f16-d64-bs8", [1], [33], dict(D=64, bs=8, Hkv=1, G=24, dtype=F16, sink=True)),
    # small multi-token steps (speculative decoding) take the packed decode path
    ("spec-f16-d128-bs16-g4", [3, 4], [50, 20], dict(D=128, bs=16, Hkv=1, G=4, dtype=F16)),
    ("spec-f32-d64-bs1-g8", [2, 5], [9, 31], dict(D=64, bs=1, Hkv=1, G=8, dtype=F32, window=11)),
    ("spec-f32-d256-bs8-g7", [4], [19], dict(D=256, bs=8, Hkv=1, G=7, dtype=F32, sink=True)),
    ("spec-chunks-f32-d128-bs16-g8", [1, 4], [33, 21], dict(D=128, bs=16, Hkv=2, G=8, dtype=F32, sink=True)),
    ("spec-mix-bf16-d80-bs32-g3", [1, 6, 0, 1], [70, 40, 5, 2], dict(D=80, bs=32, Hkv=2, G=3, dtype=BF16,
                                                                     softcap=3.0, table="neg1")),
    # mixed batches: decodes + a prefill chunk (+ an empty sequence)
    ("mix-bf16-d64-bs16-g4", [1, 12, 1], [40, 30, 7], dict(D=64, bs=16, Hkv=1, G=4, dtype=BF16)),
    ("mix-f16-d80-bs8-g1", [1, 40, 0, 1], [50, 60, 10, 1], dict(D=80, bs=8, Hkv=2, G=1, dtype=F16)),
    ("mix-f32-d96-bs32-g3", [1, 25], [100, 25], dict(D=96, bs=32, Hkv=1, G=3, dtype=F32, window=12,
                                                     sink=True)),
    ("mix-bf16-d112-bs1-g7", [18, 1, 1], [18, 9, 44], dict(D=112, bs=1, Hkv=1, G=7, dtype=BF16,
                                                          table="neg1")),
    # layouts: q from a fused qkv buffer, interleaved / padded caches, padded out
    ("lay-qkv-f16-d64-bs16-g4", [9, 1], [30, 16], dict(D=64, bs=16, Hkv=2, G=4, dtype=F16, q_layout="qkv",
                                                       layout="kv_interleaved")),
    ("dec-lay-pad-f32-d128-bs8-g1", [1, 1], [23, 50], dict(D=128, bs=8, Hkv=2, G=1, dtype=F32,
                                                       layout="padded_heads", q_layout="qkv")),
    ("lay-pad-bf16-d96-bs32-g3", [20], [44], dict(D=96, bs=32, Hkv=2, G=3, dtype=BF16,
                                                  layout="padded_heads")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paged_attention(case):
    name, q_lens, kv_lens, kw = case
    p = build(q_lens, kv_lens, seed=zlib.crc32(name.encode()) % 1000, **kw)
    decode = cfgs.use_decode(max(q_lens), kw["G"])
    assert decode == name.startswith(("dec", "spec")), "case does not exercise the kernel its name says"
    out, lse = poisoned_outputs(p, "padded" if "lay-pad" in name else "plain")
    pa.paged_attention(out, lse, *args_of(p))
    check(p, out, lse, name)


def test_paged_attention_without_lse():
    p = build([5, 1], [20, 9], D=64, bs=8, Hkv=1, G=2, dtype=F16, sink=True)
    out, _ = poisoned_outputs(p)
    pa.paged_attention(out, None, *args_of(p))
    check(p, out, None, "no-lse")
    p = build([1, 1], [200, 9], D=64, bs=8, Hkv=1, G=2, dtype=F16, sink=True)
    out, _ = poisoned_outputs(p)
    a = args_of(p)
    pa.launch_decode(out, None, *a[:8], a[8], a[9], a[10], a[11], a[12], num_splits=3)
    check(p, out, None, "no-lse-split")


# (id, q_lens, kv_lens, num_splits, dict) -- forced split counts, including more splits than
# key tiles (empty splits write lse = -inf and must merge exactly).
SPLIT_CASES = [
    ("s2-f32-d64-bs16", [1, 1], [70, 3], 2, dict(D=64, bs=16, Hkv=1, G=2, dtype=F32)),
    ("s5-f16-d128-bs1", [1], [150], 5, dict(D=128, bs=1, Hkv=1, G=4, dtype=F16)),
    ("s16-empty-f32-d80-bs8", [1, 1], [20, 100], 16, dict(D=80, bs=8, Hkv=1, G=3, dtype=F32, sink=True)),
    ("s7-empty-bf16-d256-bs32", [1], [40], 7, dict(D=256, bs=32, Hkv=1, G=7, dtype=BF16, softcap=3.0)),
    ("s4-win-f16-d96-bs8", [1, 1], [130, 12], 4, dict(D=96, bs=8, Hkv=2, G=1, dtype=F16, window=40,
                                                     table="neg1")),
    ("s3-spec-f32-d112-bs128", [3, 1], [140, 2], 3, dict(D=112, bs=128, Hkv=1, G=8, dtype=F32,
                                                         sink=True)),
    ("s9-g24-f16-d64-bs16", [2], [90], 9, dict(D=64, bs=16, Hkv=1, G=24, dtype=F16, window=50)),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_decode_splits(case):
    name, q_lens, kv_lens, splits, kw = case
    p = build(q_lens, kv_lens, seed=zlib.crc32(name.encode()) % 1000, **kw)
    out, lse = poisoned_outputs(p)
    a = args_of(p)
    pa.launch_decode(out, lse, *a[:8], a[8], a[9], a[10], a[11], a[12], num_splits=splits)
    check(p, out, lse, name)


def _all_prefill_configs():
    seen = []
    for arch in cfgs.ARCHS:
        for bits, dtype in ((16, F16), (32, F32)):
            for bd in (64, 128, 256):
                for c in cfgs.prefill_configs(dtype, bd, arch):
                    if (dtype, bd, c.block_m, c.block_n) not in [(s[0], s[1], s[2].block_m, s[2].block_n)
                                                                 for s in seen]:
                        seen.append((dtype, bd, c))
    return seen


PREFILL_CFGS = _all_prefill_configs()


@pytest.mark.parametrize("dtype,bd,cfg", PREFILL_CFGS,
                         ids=[f"{str(d)[6:]}-bd{b}-m{c.block_m}n{c.block_n}" for d, b, c in PREFILL_CFGS])
def test_prefill_every_tile_shape(dtype, bd, cfg):
    """Each (BLOCK_M, BLOCK_N) any launcher or the tuner can pick, with window + causal edges."""
    D = {64: 64, 128: 112, 256: 256}[bd]
    p = build([cfg.block_m + 3, 2], [cfg.block_m + 40, 2], D=D, bs=8, Hkv=1, G=2, dtype=dtype,
              window=cfg.block_n + 5, seed=bd)
    out, lse = poisoned_outputs(p)
    a = args_of(p)
    pa.launch_prefill(out, lse, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[8], a[9], a[10], a[11],
                      a[12], cfg=cfg)
    check(p, out, lse, f"cfg {cfg}")


BOUNDARY_TILES = [(F32, 16, 16), (F32, 32, 16), (F16, 64, 32), (BF16, 128, 32), (F16, 128, 64)]


@pytest.mark.parametrize("dtype,bm,bn", BOUNDARY_TILES, ids=[f"m{m}n{n}" for _, m, n in BOUNDARY_TILES])
@pytest.mark.parametrize("windowed", [False, True], ids=["causal", "window"])
def test_prefill_tile_boundaries(dtype, bm, bn, windowed):
    """First query positions at every residue mod BLOCK_N, so the split between unmasked
    interior tiles and masked edge tiles is checked at each off-by-one position."""
    W = bm + bn + 5 if windowed else None
    base = (W + bn) if windowed else 2 * bn
    step = max(1, bn // 16)
    residues = sorted(set(range(0, bn, step)) | {bn - 2, bn - 1, 1})
    q_lens = [bm + 3] * len(residues)
    kv_lens = [base + r + bm + 3 for r in residues]
    p = build(q_lens, kv_lens, D=64, bs=16, Hkv=1, G=1, dtype=dtype, window=W, seed=bm + bn)
    out, lse = poisoned_outputs(p)
    a = args_of(p)
    cfg = cfgs.PrefillConfig(bm, bn, 4, 2)
    pa.launch_prefill(out, lse, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[8], a[9], a[10], a[11],
                      a[12], cfg=cfg)
    check(p, out, lse, f"boundaries {cfg} W={W}")


def _all_decode_configs():
    seen = []
    for arch in cfgs.ARCHS:
        for dtype in (F16, F32):
            for bd in (64, 128, 256):
                for rows in cfgs.decode_row_options(dtype, bd):
                    for c in cfgs.decode_configs(dtype, bd, arch, rows):
                        key = (dtype, bd, rows, c.block_n)
                        if key not in [s[:4] for s in seen]:
                            seen.append(key + (c,))
    return seen


DECODE_CFGS = _all_decode_configs()


@pytest.mark.parametrize("dtype,bd,rows,bn,cfg", DECODE_CFGS,
                         ids=[f"{str(d)[6:]}-bd{b}-r{r}-n{n}" for d, b, r, n, _ in DECODE_CFGS])
def test_decode_every_tile_shape(dtype, bd, rows, bn, cfg):
    D = {64: 64, 128: 96, 256: 256}[bd]
    G = 4 if rows == 16 else 12  # 12 x 3 queries = 36 rows -> ROWS = 64
    q_lens = [1, 1] if rows == 16 else [3, 1]
    p = build(q_lens, [3 * bn + 5, 9], D=D, bs=16, Hkv=1, G=G, dtype=dtype, sink=True, seed=bn)
    out, lse = poisoned_outputs(p)
    a = args_of(p)
    assert cfgs.decode_rows(G * max(q_lens), dtype, bd) == rows
    pa.launch_decode(out, lse, *a[:8], a[8], a[9], a[10], a[11], a[12], cfg=cfg, num_splits=2)
    check(p, out, lse, f"cfg {cfg}")


def _triton_rejects(dtype, head_dim, block_size, num_heads, num_kv_heads):
    """The Triton paged_attention capability record's verdict on a (CUDA) call."""
    call = Call("paged_attention", "cuda", dtype, head_dim, block_size, num_heads, num_kv_heads, dtype)
    return capability("paged_attention", "triton").rejects(call)


def test_supports():
    assert _triton_rejects(F16, 128, 16, 32, 8) is None
    assert _triton_rejects(BF16, 80, 1, 7, 1) is None
    assert _triton_rejects(F32, 256, 256, 4, 4) is None
    assert _triton_rejects(F16, 192, 16, 8, 8) is not None
    assert _triton_rejects(F16, 128, 512, 8, 8) is not None
    assert _triton_rejects(torch.float64, 128, 16, 8, 8) is not None


def test_autotune_cache(monkeypatch):
    """The tuner benchmarks each candidate once per key (GPU only) and caches the winner."""
    import triton.testing

    calls = []
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), times[calls[-1]])[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("KVMEM_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(cfgs, "interpreting", lambda: False)
    monkeypatch.setattr(cfgs, "_TUNED", {})

    class FakeCuda:
        type = "cuda"

    key = ("test", 1)
    best = cfgs.tuned("prefill", key, ["a", "b", "c"], "a", calls.append, FakeCuda())
    assert best == "b" and calls == ["a", "b", "c"]
    assert cfgs.tuned("prefill", key, ["a", "b", "c"], "a", calls.append, FakeCuda()) == "b"
    assert calls == ["a", "b", "c"]  # cached: no more benchmarking
    # CPU / interpreter / disabled: the heuristic, nothing benchmarked
    assert cfgs.tuned("prefill", ("other",), ["a", "b"], "a", calls.append, torch.device("cpu")) == "a"
    monkeypatch.setenv("KVMEM_TRITON_AUTOTUNE", "0")
    assert cfgs.tuned("prefill", ("other",), ["a", "b"], "a", calls.append, FakeCuda()) == "a"
    assert calls == ["a", "b", "c"]


def test_aot_enumeration_covers_launchers():
    """Every config a launcher or the tuner can pick is in the AOT enumeration."""
    for arch in cfgs.ARCHS:
        names = {v.name for v in cfgs.aot_variants(arch)}
        for dtype in cfgs.SUPPORTED_DTYPES:
            dn = cfgs.DTYPE_NAMES[dtype]
            for hd in cfgs.SUPPORTED_HEAD_DIMS:
                bd = cfgs.block_d(hd)
                for c in cfgs.prefill_configs(dtype, bd, arch):
                    for sc in (False, True):
                        for rope, neox in ((False, True), (True, True), (True, False)):
                            assert (f"prefill[{dn}; BLOCK_D={bd},BLOCK_M={c.block_m},BLOCK_N={c.block_n},SOFTCAP={sc},"
                                    f"FP32={dtype == F32},ROPE={rope},ROPE_NEOX={neox},"
                                    f"SEARCH_BLOCK={cfgs.SEARCH_BLOCK},FORMAT=0,HAS_SCALE=False; w{c.num_warps} "
                                    f"s{1 if rope else c.num_stages}]") in names
                for g in (1, 3, 4, 7, 8, 16, 24, 64):
                    for ql in (1, 2, 4, 8):
                        if not cfgs.use_decode(ql, g):
                            continue
                        rows = cfgs.decode_rows(g * ql, dtype, bd)
                        for c in cfgs.decode_configs(dtype, bd, arch, rows):
                            for sc in (False, True):
                                for rope, neox in ((False, True), (True, True), (True, False)):
                                    assert (f"decode[{dn}; BLOCK_D={bd},ROWS={rows},BLOCK_N={c.block_n},SOFTCAP={sc},"
                                            f"FP32={dtype == F32},ROPE={rope},ROPE_NEOX={neox},FORMAT=0,HAS_SCALE=False; w{c.num_warps} "
                                            f"s{1 if rope else c.num_stages}]") in names


# ---------------------------------------------------------------------------------------------
# Compiled, on a real GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_full_product():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["KVMEM_TRITON_GPU_CHECK"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.dirname(here)  # cases.py, tolerances.py
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                         text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]


if __name__ == "__main__":
    if os.environ.get("KVMEM_TRITON_GPU_CHECK"):
        gpu_full_product()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
