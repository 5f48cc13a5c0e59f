"""Argument checks of ``cache_write`` (see ``kvmem/ops/_validate.py``)."""

from __future__ import annotations

import torch

from kvmem.ops._validate import FLOAT_DTYPES, QUANT_CACHE_DTYPES, fail, kv_scales, shape, tensor, unit_last_stride


def structure(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    op = "cache_write"
    quant = k_scale is not None or v_scale is not None
    tensor(op, "k_cache", k_cache, ndim=4, dtypes=QUANT_CACHE_DTYPES if quant else FLOAT_DTYPES)
    dev = k_cache.device
    tensor(op, "v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev, like="k_cache")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        fail(op, "v_cache", f"of k_cache's shape {tuple(k_cache.shape)}", f"shape {tuple(v_cache.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        unit_last_stride(op, name, c)
    for name, t in (("k", k), ("v", v)):
        # any float dtype: rounded to nearest even into the cache (after / scale when given)
        tensor(op, name, t, ndim=3, dtypes=FLOAT_DTYPES, device=dev, like="k_cache")
        unit_last_stride(op, name, t)
        if tuple(t.shape[1:]) != tuple(k_cache.shape[2:]):
            fail(op, name, f"of shape [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}] (the cache's heads and head_dim)",
                  f"shape {tuple(t.shape)}")
    if v.shape[0] != k.shape[0]:
        fail(op, "v", f"of k's shape {tuple(k.shape)}", f"shape {tuple(v.shape)}")
    if v.dtype != k.dtype:
        fail(op, "v", f"of k's dtype {k.dtype}", v.dtype, TypeError)
    tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=dev, like="k_cache")
    shape(op, "slot_mapping", slot_mapping, (k.shape[0],))
    kv_scales(op, k_scale, v_scale, k_cache.shape[2], dev)


def values(k_cache, slot_mapping):
    op = "cache_write"
    capacity = k_cache.shape[0] * k_cache.shape[1]
    slots = slot_mapping.cpu()
    bad = (slots < -1) | (slots >= capacity)
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        fail(op, "slot_mapping", f"in [-1, num_blocks*block_size={capacity})", f"slot_mapping[{t}]={int(slots[t])}")
    used = slots[slots >= 0]
    if used.numel() != used.unique().numel():
        fail(op, "slot_mapping", "free of duplicate slots (-1 excepted)", "a slot written twice")
