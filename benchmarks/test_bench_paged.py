"""pytest-benchmark suite: the cases of ``python -m kvmem.bench decode|prefill``.

    python -m pytest benchmarks --benchmark-only [-k cpu] [--benchmark-json out.json]

CPU cases run anywhere; GPU cases are marked ``gpu`` and skipped without CUDA. Each test times
one implementation on one case (kvmem's automatically selected backend, or a peer built by
:mod:`kvmem.bench.peers`), after checking its output once against kvmem's reference.
"""

from __future__ import annotations

import functools

import pytest
import torch

from kvmem.bench import harness, peers
from kvmem.bench.inputs import paged_batch

IMPLS = {"cpu": ["kvmem", "sdpa[default]", "sdpa[math]", "flex"],
         "cuda": ["kvmem", "sdpa[flash]", "sdpa[efficient]", "sdpa[cudnn]", "sdpa[math]", "flex"]}
SHAPE = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _params():
    params = []
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.gpu] if dev == "cuda" else []
        for mode in harness.MODES:
            for batch, ctx, q_len in harness.cases(mode, dev):
                for impl in IMPLS[dev]:
                    params.append(pytest.param(dev, mode, batch, ctx, q_len, impl, marks=marks,
                                               id=f"{dev}-{mode}-B{batch}-ctx{ctx}-q{q_len}-{impl}"))
    return params


@functools.lru_cache(maxsize=1)  # parameters are case-major: each case is built once
def _case(dev, batch, ctx, q_len):
    b = paged_batch(batch, ctx, q_len, dtype=DTYPE[dev], device=dev, **SHAPE)
    ref = harness.reference_output(b).float()
    impls, skipped = peers.kvmem_impls(b)
    found, skip = peers.peer_impls(b, flex_compile=True)
    byname = {i.name: i for i in found}
    auto = [i for i in impls if i.note == "auto"]
    if auto:
        byname["kvmem"] = auto[0]
    return b, ref, byname, dict(skipped + skip)


@pytest.mark.parametrize("dev,mode,batch,ctx,q_len,impl", _params())
def test_paged_attention(benchmark, dev, mode, batch, ctx, q_len, impl):
    b, ref, impls, skipped = _case(dev, batch, ctx, q_len)
    if impl not in impls:
        pytest.skip(skipped.get(impl, f"{impl} cannot run here"))
    run = impls[impl]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fn():
        out = run.fn()
        sync()
        return out

    with run.context():
        diff = (run.tokens(fn()).float() - ref).abs().max().item()
        assert diff <= harness.TOLERANCE[b.q.dtype], f"{run.name}: max|out - reference| = {diff:.2e}"
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(impl=run.name, mode=mode, max_diff=diff, gbps=b.kv_bytes() / t / 1e9,
                                tflops=b.flops(True) / t / 1e12)
