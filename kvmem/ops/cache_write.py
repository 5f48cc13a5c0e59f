"""``kvmem::cache_write``: scatter new K/V tokens into their pages."""

from __future__ import annotations

from typing import Optional

import torch

from kvmem import backends
from kvmem.ops import _validate


@torch.library.custom_op("kvmem::cache_write", mutates_args=("k_cache", "v_cache"))
def _cache_write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                    v_scale: Optional[torch.Tensor] = None) -> None:
    backend = backends.select(backends.Call.cache_write(k, k_cache, k_scale))
    if k_scale is None:
        backend.cache_write(k, v, k_cache, v_cache, slot_mapping)
    else:
        backend.cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_cache_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    return None


def cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor, *, k_scale: Optional[torch.Tensor] = None,
                v_scale: Optional[torch.Tensor] = None, check: bool = True) -> None:
    """Write ``k``/``v`` into the paged caches in place.

    Parameters
    ----------
    k, v: [num_tokens, num_kv_heads, head_dim], the caches' dtype (any float dtype with scales),
        unit last stride
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (stride-generic); with
        scales any float or fp8 dtype
    slot_mapping: [num_tokens] int64, ``block * block_size + offset``; -1 skips a token
    k_scale, v_scale: fp32 0-d or [num_kv_heads] quantisation scales (given together):
        ``k / k_scale`` is stored; ``paged_attention`` with the same scales multiplies them back.
        Today reference-only (other backends fall back with one log line).
    check: validate slot values (range, no duplicates; one device->host sync)
    """
    _validate.cache_write_structure(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if check:
        _validate.cache_write_values(k_cache, slot_mapping)
    torch.ops.kvmem.cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
