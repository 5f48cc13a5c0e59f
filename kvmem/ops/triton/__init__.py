"""Triton backend of kvmem's paged-KV ops (see ``kvmem.ops.reference`` for the semantics)."""

from __future__ import annotations

from typing import Optional

import torch

from . import configs
from .cache_write import cache_write
from .merge_states import merge_states
from .paged_attention import paged_attention

__all__ = ["cache_write", "paged_attention", "merge_states", "supports", "configs"]


def supports(q_dtype, head_dim, block_size, num_heads, num_kv_heads) -> Optional[str]:
    """None if the Triton kernels handle this shape/dtype, else the reason they do not."""
    if q_dtype not in configs.SUPPORTED_DTYPES:
        return f"triton backend: dtype {q_dtype} not supported (fp16, bf16, fp32)"
    if head_dim not in configs.SUPPORTED_HEAD_DIMS:
        return f"triton backend: head_dim {head_dim} not in {configs.SUPPORTED_HEAD_DIMS}"
    if not 1 <= block_size <= configs.MAX_PAGE_SIZE:
        return f"triton backend: block_size {block_size} not in [1, {configs.MAX_PAGE_SIZE}]"
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        return (f"triton backend: num_heads {num_heads} is not a positive multiple of "
                f"num_kv_heads {num_kv_heads}")
    return None
