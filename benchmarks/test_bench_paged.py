"""pytest-benchmark suite: the cases of ``python -m kvmem.bench decode|prefill``.

    python -m pytest benchmarks --benchmark-only [-k cpu] [--benchmark-json out.json]
    python -m pytest benchmarks -k "cpu and quick" --benchmark-disable     # CI: < 90 s on 2 cores
    KVMEM_BENCH_QUICK=1 python -m pytest benchmarks                         # only the quick cases

Two parameter sets: the full sweep (``harness.cases``) and the quick one (``harness.QUICK``, the
cases of ``python -m kvmem.bench --quick``; ids contain ``quick``, marker ``quick``).
``KVMEM_BENCH_QUICK=1`` collects only the quick set. CPU cases run anywhere; GPU cases are marked
``gpu`` and skipped without CUDA.

Each test times one implementation on one case after checking its output once against kvmem's
reference: kvmem's automatically selected backend (``kvmem``), each kvmem backend forced
(``kvmem[cpu]``, ``kvmem[cuda]``; ``kvmem[triton]`` on CUDA only), and the peers the harness
builds (:mod:`kvmem.bench.peers`: torch SDPA per backend, FlexAttention on a contiguous copy and
on kvmem's pages, FlashInfer, flash-attn). What cannot run here is skipped with the harness's
reason. As in the harness, FlexAttention is compiled except for quick CPU cases (eager there:
``flex[eager]``, ``flex[paged,eager]``), since compiling it costs tens of seconds on a small CPU.
With ``--benchmark-disable`` each test runs its implementation once (the correctness check).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from kvmem.bench import harness, peers
from kvmem.bench.inputs import paged_batch

QUICK_ONLY = os.environ.get("KVMEM_BENCH_QUICK", "") not in ("", "0")
KVMEM = {"cpu": ["kvmem", "kvmem[cpu]", "kvmem[triton]", "kvmem[cuda]"],
         "cuda": ["kvmem", "kvmem[cuda]", "kvmem[triton]", "kvmem[cpu]"]}
SDPA = {"cpu": ["sdpa[default]", "sdpa[math]"],
        "cuda": ["sdpa[flash]", "sdpa[efficient]", "sdpa[cudnn]", "sdpa[math]"]}
OPTIONAL = ["flashinfer", "flash-attn"]
SHAPE = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def flex_compiled(dev: str, quick: bool) -> bool:
    """The harness's rule: FlexAttention is compiled unless a quick CPU run."""
    return dev == "cuda" or not quick


def impl_names(dev: str, quick: bool):
    """Every implementation label a case of this device and size reports (run or skipped)."""
    flex = ["flex", "flex[paged]"] if flex_compiled(dev, quick) else ["flex[eager]", "flex[paged,eager]"]
    return KVMEM[dev] + SDPA[dev] + flex + OPTIONAL


def case_list(mode: str, dev: str, quick: bool):
    """``(batch, ctx, q_len)`` of the harness's sweep (quick: its ``--quick`` cases)."""
    return harness.cases(mode, dev, quick=quick)


def _params():
    params = []
    for quick in ((True,) if QUICK_ONLY else (False, True)):
        for dev in ("cpu", "cuda"):
            marks = ([pytest.mark.gpu] if dev == "cuda" else []) + ([pytest.mark.quick] if quick else [])
            size = "quick-" if quick else ""
            for mode in harness.MODES:
                for batch, ctx, q_len in case_list(mode, dev, quick):
                    for impl in impl_names(dev, quick):
                        params.append(pytest.param(dev, quick, mode, batch, ctx, q_len, impl, marks=marks,
                                                   id=f"{dev}-{size}{mode}-B{batch}-ctx{ctx}-q{q_len}-{impl}"))
    return params


@functools.lru_cache(maxsize=1)  # parameters are case-major: each case is built once
def _case(dev, quick, batch, ctx, q_len):
    b = paged_batch(batch, ctx, q_len, dtype=DTYPE[dev], device=dev, **SHAPE)
    ref = harness.reference_output(b).float()
    auto, skipped = peers.kvmem_impls(b)
    forced_names = ["cpu", "cuda"] + (["triton"] if dev == "cuda" else [])
    forced, skip = peers.kvmem_impls(b, only=forced_names)
    skipped += skip
    if dev != "cuda":
        skipped.append(("kvmem[triton]", "timed on CUDA only (on CPU Triton runs only in its interpreter: "
                                         "tests/ops/test_paged_attention_triton.py)"))
    found, skip = peers.peer_impls(b, flex_compile=flex_compiled(dev, quick))
    skipped += skip
    byname = {i.name: i for i in forced + found}
    selected = [i for i in auto if i.note == "auto"]
    if selected:
        byname["kvmem"] = selected[0]
    else:
        skipped.append(("kvmem", "no kvmem backend is selected automatically for this call"))
    return b, ref, byname, dict(skipped)


@pytest.mark.parametrize("dev,quick,mode,batch,ctx,q_len,impl", _params())
def test_paged_attention(benchmark, dev, quick, mode, batch, ctx, q_len, impl):
    b, ref, impls, skipped = _case(dev, quick, batch, ctx, q_len)
    if impl not in impls:
        pytest.skip(f"{impl}: {skipped.get(impl, 'cannot run here')}")
    run = impls[impl]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fn():
        out = run.fn()
        sync()
        return out

    with run.context():
        try:
            first = fn()  # compiles what needs compiling
        except Exception as e:  # noqa: BLE001 - as in the harness: a peer that fails is skipped
            if run.kvmem:
                raise
            pytest.skip(f"{impl}: {peers.first_line(e)}")
        diff = (run.tokens(first).float() - ref).abs().max().item()
        del first
        assert diff <= harness.TOLERANCE[b.q.dtype], f"{run.name}: max|out - reference| = {diff:.2e} (WRONG)"
        benchmark.pedantic(fn, rounds=3 if quick else 5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(impl=run.name, mode=mode, max_diff=diff)
    if benchmark.disabled or benchmark.stats is None:
        return
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(gbps=b.kv_bytes() / t / 1e9, tflops=b.flops(True) / t / 1e12)
