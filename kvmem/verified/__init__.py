"""The record of configurations verified on real GPUs (``cuda.json`` beside this file).

``benchmarks/gpu_check.sh`` runs every backend against the reference on a GPU and writes a
``verified.json``; committing its entries here is what lets the dispatcher choose the CUDA kernels
by default on that GPU architecture. Entries: arch -> {"gpu", "driver", "torch", "triton",
"date", "passed": [{"op", "dtype", "head_dim", "block_size"}, ...]}.
"""

from __future__ import annotations

import functools
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def record(backend: str) -> dict:
    path = os.path.join(HERE, f"{backend}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("records", {})


@functools.lru_cache(maxsize=None)
def _passed(backend: str, arch: str) -> frozenset:
    entries = record(backend).get(arch, {}).get("passed", [])
    return frozenset((e["op"], e["dtype"], int(e["head_dim"]), int(e.get("block_size", 0))) for e in entries)


def is_verified(backend: str, arch: str, call) -> bool:
    """Whether ``call`` (a kvmem.backends.Call) matches a passing entry for ``arch``."""
    dtype = str(call.dtype).replace("torch.", "")
    block_size = call.block_size if call.op == "paged_attention" else 0
    return (call.op, dtype, call.head_dim, block_size) in _passed(backend, arch)
