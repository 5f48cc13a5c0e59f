"""The summary pool beside the page pool: one ``[num_kv_heads, 2, head_dim]`` summary per page.

Summaries are written once per block, when it leaves the window (between steps), and read by
``memory_select``; the math is ``kvmem.ops.memory_select.reference``.
"""

from __future__ import annotations

import torch

from kvmem.ops.memory_select import SUMMARY_KINDS, compute_summaries, write_summaries

__all__ = ["SUMMARY_KINDS", "compute_summaries", "write_summaries", "empty_summaries"]


def empty_summaries(num_blocks: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """A summary pool ``[num_blocks, num_kv_heads, 2, head_dim]`` indexed by page id, NaN until written
    (a read of a page never summarised shows)."""
    return torch.full((num_blocks, num_kv_heads, 2, head_dim), float("nan"), dtype=dtype, device=device)
