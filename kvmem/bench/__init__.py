"""Benchmark helpers and ``python -m kvmem.bench`` (grows with the benchmark issue)."""
