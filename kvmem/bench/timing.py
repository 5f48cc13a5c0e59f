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
    x = torch.rand(nbytes // 4, device=device)  # not zeros
    t = median_time(lambda: x.sum(), device=device, reps=5)
    del x
    return nbytes / t


def copy_bandwidth(device="cpu", nbytes: int = 1 << 30) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted): ``dst.copy_(src)``."""
    src = torch.rand(nbytes // 8, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device=device, reps=5)
    return 2 * src.numel() * 4 / t
