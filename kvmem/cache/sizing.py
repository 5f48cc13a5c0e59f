"""Pool sizing: bytes of a block, blocks a batch needs, a memory budget split over layer groups."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Dict, Optional

import torch

from kvmem.cache.metadata import page_bytes

__all__ = ["parse_memory", "bytes_per_block", "needed_blocks", "size_groups", "MIN_STEP_ALLOWANCE"]

MIN_STEP_ALLOWANCE = 64  # tokens one later step (assisted decoding) may add, for sizing sliding groups


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_memory(memory) -> int:
    """Bytes from an int/float or a string such as ``"512MiB"`` or ``"2GB"``."""
    if isinstance(memory, bool):
        raise TypeError("kvmem: memory must be a number of bytes or a string like '2GiB', got a bool")
    if isinstance(memory, (int, float)):
        value = int(memory)
    elif isinstance(memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", memory)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"kvmem: cannot parse memory={memory!r} (use bytes or e.g. '512MiB', '2GB')")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"kvmem: memory must be a number of bytes or a string like '2GiB', got {type(memory).__name__}")
    if value <= 0:
        raise ValueError(f"kvmem: memory must be > 0 bytes, got {memory!r}")
    return value


def bytes_per_block(groups, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> Dict[str, int]:
    """Bytes of one block of each group (all its layers, K and V)."""
    return {g.name: page_bytes(len(g.layers), block_size, num_kv_heads, head_dim, dtype) for g in groups}


def needed_blocks(groups, block_size: int, *, rows: int, step_len: int,
                  max_cache_len: Optional[int]) -> Optional[Dict[str, int]]:
    """Blocks per group for ``rows`` sequences of up to ``max_cache_len`` tokens (None if unknown).

    Full groups: ``ceil((max_cache_len + 1) / block_size) + 1`` per row. Sliding groups (window
    ``W``): ``ceil((W - 1 + max(step_len, 64)) / block_size) + 2`` per row (the window plus one
    step of new tokens, ``step_len`` being the prompt), capped at the full count.
    """
    if max_cache_len is None:
        return None
    full = _cdiv(int(max_cache_len) + 1, block_size) + 1
    out = {}
    for g in groups:
        per_row = full
        if g.window is not None:
            per_row = min(full, _cdiv(g.window - 1 + max(step_len, MIN_STEP_ALLOWANCE), block_size) + 2)
        out[g.name] = max(1, rows * per_row)
    return out


def size_groups(groups, block_size: int, per_block: Dict[str, int], *, rows: int, step_len: int,
                num_blocks=None, memory: Optional[int] = None, max_batch_size: Optional[int] = None,
                max_cache_len: Optional[int] = None) -> Dict[str, int]:
    """Blocks per layer group: ``num_blocks`` if given, else ``memory`` bytes split over the groups
    (sliding groups get what they need, the full-attention group the rest), else what
    ``rows x max_cache_len`` tokens need (``needed_blocks``)."""
    if isinstance(num_blocks, Mapping):
        return {g.name: int(num_blocks[g.name]) for g in groups}
    if num_blocks is not None:
        return {g.name: int(num_blocks) for g in groups}
    need = needed_blocks(groups, block_size, rows=max(rows, max_batch_size or 0), step_len=step_len,
                         max_cache_len=max_cache_len)
    if memory is not None:
        n = memory // sum(per_block.values())
        if n < 1:
            raise ValueError(f"kvmem: memory={memory} bytes is less than one block of every layer group "
                             f"({sum(per_block.values())} bytes)")
        out = {g.name: n for g in groups}
        if need is not None:  # sliding groups need less: give the rest to the full-attention group
            for g in groups:
                if g.window is not None:
                    out[g.name] = max(1, min(n, need[g.name]))
            full = [g.name for g in groups if g.window is None]
            if full:
                left = memory - sum(out[k] * per_block[k] for k in out)
                out[full[0]] += left // per_block[full[0]]
        return out
    if need is None:
        raise ValueError("kvmem: PagedKVCache needs num_blocks=, memory= or max_cache_len= to size its pools "
                         "(generate() passes max_cache_len)")
    return need
