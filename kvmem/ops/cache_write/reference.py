"""Reference ``cache_write`` (semantics: ``kvmem.ops.spec``)."""

from __future__ import annotations

from typing import Optional

import torch

from kvmem.ops._common import encode as _encode
from kvmem.ops._common import scale_of as _scale_of

__all__ = ["cache_write"]


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Scatter new tokens into the paged caches, in place.

    Parameters
    ----------
    k, v: [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: [num_tokens] int64, ``block * block_size + offset``; -1 skips the token.
    k_scale, v_scale: fp32 0-d or [num_kv_heads] quantisation scales: ``k / k_scale`` is stored,
        encoded by ``kvmem.ops._common.encode`` (fp32 division, clamp to +- the cache format's
        largest finite value, round to nearest even)

    Without scales ``k``/``v`` may be of another float dtype than the cache (rounded to nearest
    even into it, as ``Tensor.to``).
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    kk, vv = k[keep], v[keep]
    if k_scale is not None:
        kk = _encode(kk.float() / _scale_of(k_scale).reshape(-1, 1), k_cache.dtype)
        vv = _encode(vv.float() / _scale_of(v_scale).reshape(-1, 1), v_cache.dtype)
    k_cache[blocks, offsets] = kk.to(k_cache.dtype)
    v_cache[blocks, offsets] = vv.to(v_cache.dtype)
