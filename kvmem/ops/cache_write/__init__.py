"""``kvmem::cache_write``: scatter new K/V tokens into their pages (the op folder: ``params``,
``validate``, ``reference``, ``capabilities``, ``triton``)."""

from __future__ import annotations

from typing import Optional

import torch

from kvmem import dispatch
from kvmem.ops._common import check_all
from kvmem.ops.cache_write import capabilities, validate  # noqa: F401  (capabilities registers)
from kvmem.ops.cache_write.params import OP, CacheWriteParams

__all__ = ["cache_write", "CacheWriteParams"]


@torch.library.custom_op("kvmem::cache_write", mutates_args=("k_cache", "v_cache"))
def _cache_write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                    v_scale: Optional[torch.Tensor] = None) -> None:
    params = CacheWriteParams.from_schema(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    dispatch.select(params.call()).run(OP, params)


@_cache_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    torch._check(k.dim() == 3 and k_cache.dim() == 4, lambda: "cache_write: k 3-D, k_cache 4-D")
    checks = [(v.shape[i], k.shape[i], f"v.shape[{i}] vs k.shape[{i}]") for i in range(3)]
    checks += [(v_cache.shape[i], k_cache.shape[i], f"v_cache.shape[{i}] vs k_cache.shape[{i}]") for i in range(4)]
    checks += [(k.shape[1], k_cache.shape[2], "k heads vs cache heads"),
               (k.shape[2], k_cache.shape[3], "k head_dim vs cache head_dim"),
               (slot_mapping.shape[0], k.shape[0], "slot_mapping vs num_tokens")]
    check_all(checks)
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
    validate.structure(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if check:
        validate.values(k_cache, slot_mapping)
    params = CacheWriteParams(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    torch.ops.kvmem.cache_write(*params.to_schema())
