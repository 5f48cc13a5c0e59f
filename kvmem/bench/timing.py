"""Timing and hardware-limit measurements shared by the demo, the harness and benchmarks/."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], *, device="cpu", warmup: int = 2, reps: int = 7,
                min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds after warm-up (CPU: wall clock; CUDA: synchronised)."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(device="cpu", nbytes: int = 1 << 30) -> float:
    """Measured memory read bandwidth in bytes/s: a full-tensor sum over ``nbytes`` (> caches)."""
    return read_bandwidth_probe(device, nbytes, reps=5, warmup=2, touch=False)()


def read_bandwidth_probe(device="cpu", nbytes: int = 1 << 30, reps: int = 3, *, warmup: int = 1,
                         touch: bool = True) -> Callable[[], float]:
    """A reusable read-bandwidth measurement: the buffer is allocated (and, with ``touch``, read
    once) up front, and each call of the returned function is one sample in bytes/s (median of
    ``reps`` full-tensor sums after ``warmup``). For interleaving with the kernels it is compared
    with, so that a percentage is taken against bandwidth measured under the same conditions
    (load, frequency, page cache)."""
    x = torch.rand(nbytes // 4, device=device)  # not zeros
    if touch:
        x.sum()

    def sample() -> float:
        return nbytes / median_time(lambda: x.sum(), device=device, warmup=warmup, reps=reps)
    return sample


def copy_bandwidth(device="cpu", nbytes: int = 1 << 30) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted): ``dst.copy_(src)``."""
    src = torch.rand(nbytes // 8, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device=device, reps=5)
    return 2 * src.numel() * 4 / t


def matmul_rate(device="cpu", dtype=torch.float32, n: int = 2048) -> float:
    """Measured dense matmul rate in FLOP/s: an ``n x n @ n x n`` product in ``dtype``.

    Parameters
    ----------
    device : str or torch.device
        Where to run.
    dtype : torch.dtype
        Operand dtype (the harness uses bf16 on GPU and fp32 on CPU).
    n : int
        Matrix side; large enough that the product is compute-bound.

    Returns
    -------
    float
        ``2 n^3 / t`` for the median time ``t``.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = median_time(lambda: torch.mm(a, b, out=out), device=device, reps=5)
    return 2.0 * n ** 3 / t
