"""``KVPool``: paged K/V pools and their ``KVCacheManager``, kept across successive caches."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Dict, Optional, Sequence, Union

import torch

from kvmem.cache.manager import KVCacheManager
from kvmem.cache.metadata import LayerGroupSpec
from kvmem.cache.scales import DEFAULT_CENTER_KEYS, DEFAULT_HEADROOM, KVScales, PoolScales
from kvmem.cache.sizing import bytes_per_block
from kvmem.ops._common import is_fp8

__all__ = ["KVPool"]


class KVPool:
    """Paged K/V pools and their ``KVCacheManager``, shared by successive caches
    (``kvmem.patch(model, prefix_cache=True)``: full prompt blocks of one ``generate()`` call are
    reused by later calls with the same prefix).

    Parameters
    ----------
    groups: the model's layer groups
    num_kv_heads, head_dim: of every layer
    block_size: tokens per block
    num_blocks: group name -> blocks
    dtype, device: of the pools; ``device`` may map layer -> device (a model split over GPUs);
        ``dtype`` may be a float8 dtype (then ``scales`` holds the pages' scales)
    fingerprint: the model's ``kvmem.model_fingerprint`` (or None): the seed of the prefix hash
        chain, so blocks cached for one model are never found by another; a cache of another
        model must not use this pool (``PagedKVCache`` checks)
    kv_scales: a float8 pool's ``KVScales``, or None: each layer's first write fixes its scales
        (``kvmem.cache.scales``); fixed for the life of the pool either way
    kv_scale_headroom: the headroom of that default rule
    kv_center_keys: a float8 pool's key centring (``kvmem.cache.scales``, "Key centring")

    Attributes
    ----------
    scales: the ``PoolScales`` of a float8 pool, else None
    """

    def __init__(self, groups: Sequence[LayerGroupSpec], num_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: Dict[str, int], dtype: torch.dtype,
                 device: Union[str, torch.device, Mapping[int, Union[str, torch.device]]], *,
                 fingerprint: Optional[str] = None, kv_scales: Optional[KVScales] = None,
                 kv_scale_headroom: float = DEFAULT_HEADROOM, kv_center_keys: bool = DEFAULT_CENTER_KEYS):
        self.groups = tuple(groups)
        self.num_layers = sum(len(g.layers) for g in self.groups)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.fingerprint = fingerprint
        self.layer_devices = ({int(k): torch.device(v) for k, v in device.items()}
                              if isinstance(device, Mapping) else None)
        self.block_size, self.dtype = block_size, dtype
        self.device = self.layer_devices.get(0) if self.layer_devices else torch.device(device)
        per_block = bytes_per_block(self.groups, block_size, self.num_kv_heads, self.head_dim, dtype)
        self.manager = KVCacheManager(dict(num_blocks), block_size, self.groups, self.device,
                                      bytes_per_block=per_block, hash_seed=fingerprint)
        self.pools = self.manager.make_pools(self.num_kv_heads, self.head_dim, dtype,
                                             self.layer_devices or self.device)
        self.ids = itertools.count()
        if kv_scales is not None and not is_fp8(dtype):
            raise ValueError(f"KVPool: kv_scales are for float8 pools, got dtype {dtype}")
        self.scales = (PoolScales(dtype, self.num_layers, kv_scales, kv_scale_headroom, kv_center_keys)
                       if is_fp8(dtype) else None)
        self.live = None  # the cache currently using the pool
        #: (rows, width, device) -> StaticDecodeBuffers shared by the caches living in this pool
        self.static: Dict[tuple, object] = {}

    @property
    def num_blocks(self) -> Dict[str, int]:
        return {g.name: self.manager.allocator(g.name).num_blocks for g in self.groups}

    def grow(self, num_blocks: Dict[str, int]) -> None:
        """Grow the groups of ``num_blocks`` (group -> blocks, never fewer than now) keeping every
        page, block id and hash: the prefix cache survives (``KVCacheManager.grow``). The pages are
        copied into larger tensors; static decode buffers (and graphs captured on the old pools) are
        dropped."""
        self.manager.grow(num_blocks)
        l2g = self.manager.layer_to_group
        for layer, (k, v) in list(self.pools.items()):
            n = self.manager.allocator(l2g[layer]).num_blocks
            if k.shape[0] < n:
                pair = []
                for t in (k, v):
                    bigger = t.new_empty((n,) + tuple(t.shape[1:]))
                    bigger[: t.shape[0]].copy_(t)
                    pair.append(bigger)
                self.pools[layer] = tuple(pair)
        self.static.clear()

    def fits(self, need: Dict[str, int]) -> bool:
        nb = self.num_blocks
        return all(nb.get(k, 0) >= v for k, v in need.items())
