"""The pools' tensors of ``KVCacheManager``: allocating them and applying copy-on-write copies."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kvmem.cache.sequence import _upload

__all__ = []

_BYTE_COPIED = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class _PoolTensors:
    """Mixin of ``KVCacheManager``: ``make_pools`` and ``apply_copies`` (its state is the manager's)."""

    def make_pools(
        self,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: Union[None, str, torch.device, Mapping[int, Union[str, torch.device]]] = None,
        fill: Optional[float] = None,
        layers: Optional[Sequence[int]] = None,
    ) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """Allocate K/V pools for every layer (or ``layers``): layer -> (k_cache, v_cache).

        ``device`` is one device for all pools, or a mapping layer -> device (a model split over
        several GPUs keeps each layer's pools next to its weights); default: the manager's.

        Returns
        -------
        dict of layer -> two tensors [num_blocks of the layer's group, block_size, num_kv_heads, head_dim]
        """
        per_layer = isinstance(device, Mapping)
        one = self.device if device is None or per_layer else torch.device(device)
        pools = {}
        for layer, g in sorted(self._layer_to_group.items()):
            if layers is not None and layer not in layers:
                continue
            dev = torch.device(device.get(layer, one) or one) if per_layer else one
            shape = (self._allocators[g].num_blocks, self._block_size, num_kv_heads, head_dim)
            pair = tuple(
                torch.empty(shape, dtype=dtype, device=dev) if fill is None
                else torch.full(shape, fill, dtype=dtype, device=dev)
                for _ in range(2)
            )
            pools[layer] = pair
        return pools

    def apply_copies(self, pools: Union[Mapping[int, object], Sequence[object]]) -> None:
        """Apply and clear the pending copy-on-write copies: ``pool[dst] = pool[src]``.

        Copies are applied in the order they were recorded (a batch of ``index_copy_`` per run of
        pairs without read-after-write or write-after-write hazards).

        Parameters
        ----------
        pools: layer index -> that layer's pools: a tensor or a tuple such as ``(k_cache, v_cache)``,
            each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any tensor whose dim 0 is the
            block); a mapping, or a sequence indexed by layer. Every layer of every group with
            pending copies must be present.
        """
        todo = {g: c for g, c in self.pending_copies.items() if c}
        if not todo:
            return
        work = []
        for g, pairs in todo.items():
            n = self._allocators[g].num_blocks
            for layer in self._groups[g].layers:
                try:
                    entry = pools[layer]
                except (KeyError, IndexError):
                    raise ValueError(f"KVCacheManager.apply_copies: no pools for layer {layer} (group {g!r})") from None
                tensors = (entry,) if isinstance(entry, torch.Tensor) else tuple(entry)
                for t in tensors:
                    if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] < n:
                        raise ValueError(
                            f"KVCacheManager.apply_copies: layer {layer}'s pools must be tensors with at least "
                            f"{n} blocks in dim 0 (group {g!r}), got {getattr(t, 'shape', type(t).__name__)}"
                        )
                work.extend((t, g) for t in tensors)
        chunks = {g: _hazard_free_runs(pairs) for g, pairs in todo.items()}
        index_cache: Dict[Tuple[str, torch.device], list] = {}
        for t, g in work:
            key = (g, t.device)
            if key not in index_cache:
                index_cache[key] = [
                    tuple(_upload(np.asarray(idx, dtype=np.int64), t.device) for idx in (src, dst))
                    for src, dst in chunks[g]
                ]
            raw = t.view(torch.uint8) if t.dtype in _BYTE_COPIED else t  # no fp8 index_copy_ on CPU
            for src, dst in index_cache[key]:
                raw.index_copy_(0, dst, raw.index_select(0, src))
        for g in todo:
            self.pending_copies[g] = []


def _hazard_free_runs(pairs: Sequence[Tuple[int, int]]) -> List[Tuple[List[int], List[int]]]:
    """Split copy pairs into runs that one gather + scatter applies as if one by one."""
    runs, src, dst, written = [], [], [], set()
    for s, d in pairs:
        if s in written or d in written:  # read-after-write or write-after-write: new run
            runs.append((src, dst))
            src, dst, written = [], [], set()
        src.append(s)
        dst.append(d)
        written.add(d)
    if src:
        runs.append((src, dst))
    return runs
