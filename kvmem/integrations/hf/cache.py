"""``kvmem.PagedKVCache``: a transformers ``Cache`` whose keys/values live in kvmem's paged pools.

The HF ``Cache`` API (lengths, ``update``, beam-search reordering, ``crop``, prefix reuse, memory
use) is here; the step machine (planning, the layer step, static decode steps) is the mixin in
``kvmem.integrations.hf.steps``, whose docstring tells how a forward step runs.

Lengths: ``get_seq_length()`` is the *logical* length (the number of columns HF has fed, padding
included, like ``DynamicCache``); each row's KV length excludes its padding.

Row operations (prefix reuse, ``crop``, beam-search reordering) are the mixin in
``kvmem.integrations.hf.rows``.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple, Union

import torch

from kvmem.cache import GroupUsage, KVCacheManager, KVPool, LayerGroupSpec, StaticDecodeBuffers
from kvmem.cache.scales import DEFAULT_CENTER_KEYS, DEFAULT_HEADROOM, KVScales, PoolScales, as_kv_scales, \
    center_keys_arg
from kvmem.cache.scales import kv_cache_dtype as _parse_kv_dtype
from kvmem.cache.sizing import bytes_per_block, parse_memory, size_groups
from kvmem.ops._common import is_fp8
from kvmem.integrations import families
from kvmem.integrations.hf import context
from kvmem.integrations.hf.compat import Cache, CacheLayerMixin
from kvmem.integrations.hf.context import StepContext
from kvmem.integrations.hf.rows import _RowOps
from kvmem.integrations.hf.steps import _StepMachine
from kvmem.ops.kernel_ops import KernelOps

__all__ = ["PagedKVCache"]


class _PagedLayer(CacheLayerMixin):
    """A per-layer view (HF's ``Cache.layers`` entries); state lives in the parent cache."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, parent: "PagedKVCache", layer_idx: int, window: Optional[int]):
        super().__init__()
        self._parent = weakref.ref(parent)
        self.layer_idx = layer_idx
        self.is_sliding = window is not None
        self.sliding_window = window

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._parent().update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self._parent().get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self._parent().get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx) -> None:
        raise RuntimeError("kvmem: reorder a PagedKVCache as a whole (cache.reorder_cache), not per layer")

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("kvmem: crop a PagedKVCache as a whole (cache.crop), not per layer")


class PagedKVCache(_StepMachine, _RowOps, Cache):
    """A transformers ``Cache`` backed by kvmem's paged KV pools (use with ``attn_implementation="kvmem"``).

    Every layer's keys/values live in NHD pools ``[num_blocks, block_size, num_kv_heads, head_dim]``
    managed by a ``KVCacheManager``: full-attention layers form one layer group, sliding-window
    layers one group per window (their blocks that left the window are freed). Each batch row is
    one sequence; padding tokens (``attention_mask == 0``) are never stored.

    Parameters
    ----------
    config: the model's ``PretrainedConfig`` (the decoder text config is used)
    block_size: tokens per block (page)
    num_blocks: blocks per layer group: an int for every group, or a mapping group name -> int
        (names: ``"full"`` and ``"sliding_<W>"``, see ``group_names``)
    memory: total bytes for all pools (int, or a string like ``"2GiB"``), split over the groups;
        used when ``num_blocks`` is None
    max_batch_size, max_cache_len: size the pools for this many rows of up to this many tokens
        (``generate()`` passes them) when neither ``num_blocks`` nor ``memory`` is given
    dtype, device: of the pools (default: those of the first keys written). Without ``device``
        each layer's pools are allocated at its first ``update``, on its keys' device, so a model
        split over several GPUs (``device_map="auto"``) keeps every layer's pools next to it.
    backend: ``"auto"`` or a kvmem backend name (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``)
    pool: a ``KVPool`` to use instead of allocating pools (prefix caching across caches)
    memory_bank: a ``kvmem.integrations.hf.memory.BankSpec`` (``kvmem.patch(model, memory_bank=...)``
        makes it): the full-attention layers attend to sinks + top-k bank blocks + a local window
        (``kvmem.memory``); ``block_size`` must be the bank's
    kv_cache_dtype: the pools' dtype, as ``dtype`` but also by name (``kvmem.cache.scales.kv_cache_dtype``:
        None / ``"auto"``, ``torch.float32`` / ``"fp32"``, ``"bf16"``, ``"fp16"``,
        ``torch.float8_e4m3fn`` / ``"fp8"`` / ``"fp8_e4m3"``, ``torch.float8_e5m2`` / ``"fp8_e5m2"``); it
        may differ from the model's dtype (keys/values are converted as they are written, and back
        as attention reads them). Give ``dtype`` or ``kv_cache_dtype``, not two different ones.
    kv_scales: float8 caches only: the static per-(layer, KV head) scales (a ``kvmem.KVScales`` from
        ``kvmem.calibrate_kv_scales``, one float, or per-layer ``(k_scale, v_scale)`` pairs), or
        None / ``"auto"``: each layer's first write fixes its scales from what it writes
        (``absmax * kv_scale_headroom / finfo.max`` per KV head, ``kvmem.cache.scales``). Fixed
        for the life of the pools (``kv_scales`` reads them back).
    kv_scale_headroom: the headroom of that default rule (default ``kvmem.cache.scales.DEFAULT_HEADROOM``)
    kv_center_keys: float8 only: pages store ``k - mu``, ``mu`` fixed by each layer's first write ("Key
        centring" in ``kvmem.cache.scales``; not in softcap / sink / memory layers); a KVPool brings its own
    num_kv_heads: the KV heads this cache holds (default the config's): under tensor parallelism this
        rank's, ``kvmem.integrations.hf.tp.rank_kv_heads(model)`` (``generate()`` passes it)

    Notes
    -----
    Pools are allocated at the first ``update`` (or ``early_initialization``). Running out of blocks
    raises ``kvmem.CacheFullError`` before the step changes anything.

    ``is_compileable`` stays False: transformers would then build 4D masks and compile the whole
    forward, prefill included, around a cache whose planning is host code. Compile or capture the
    decode step instead (``static_decode_step``, ``kvmem.integrations.DecodeGraphRunner``).
    """

    is_compileable = False

    def __init__(self, config, *, block_size: int = 16, num_blocks: Union[None, int, Mapping] = None,
                 memory: Union[None, int, float, str] = None, max_batch_size: Optional[int] = None,
                 max_cache_len: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 device: Union[None, str, torch.device] = None, backend: str = "auto",
                 pool: Optional["KVPool"] = None, memory_bank=None, kv_cache_dtype=None, kv_scales=None,
                 kv_scale_headroom: float = DEFAULT_HEADROOM, kv_center_keys: bool = DEFAULT_CENTER_KEYS,
                 num_kv_heads: Optional[int] = None):
        families.resolve(config)
        tc = families.text_config(config)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"PagedKVCache: block_size must be an int >= 1, got {block_size!r}")
        self.model_type = getattr(tc, "model_type", "?")
        self.num_layers, heads, self.head_dim = families.kv_dims(config)
        self.num_kv_heads = heads if num_kv_heads is None else int(num_kv_heads)
        self.windows: List[Optional[int]] = families.layer_windows(config)
        self.groups: Tuple[LayerGroupSpec, ...] = tuple(
            LayerGroupSpec(name, layers, w) for name, layers, w in families.group_layers(self.windows))
        self.block_size = block_size
        if num_blocks is not None and not isinstance(num_blocks, Mapping):
            if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
                raise ValueError(f"PagedKVCache: num_blocks must be an int >= 1 or a mapping, got {num_blocks!r}")
        if isinstance(num_blocks, Mapping):
            missing = [g.name for g in self.groups if g.name not in num_blocks]
            if missing:
                raise ValueError(f"PagedKVCache: num_blocks has no entry for group(s) {missing} "
                                 f"(groups: {self.group_names})")
        self._num_blocks_arg = num_blocks
        self._memory = None if memory is None else parse_memory(memory)
        self._max_batch_size = max_batch_size
        self._max_cache_len = max_cache_len
        named = _parse_kv_dtype(kv_cache_dtype, "PagedKVCache")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"PagedKVCache: dtype must be a torch dtype or None, got {type(dtype).__name__}")
        if dtype is not None and named is not None and dtype != named:
            raise ValueError(f"PagedKVCache: dtype={dtype} and kv_cache_dtype={kv_cache_dtype!r} differ (give one)")
        self._dtype = named or (None if dtype is None else _parse_kv_dtype(dtype, "PagedKVCache"))
        given = as_kv_scales(kv_scales, self.num_layers, self.num_kv_heads, "PagedKVCache")
        if given is not None and not (self._dtype is not None and is_fp8(self._dtype)):
            raise ValueError(f"PagedKVCache: kv_scales are for float8 caches (kv_cache_dtype='fp8_e4m3' or "
                             f"'fp8_e5m2'), got kv_cache_dtype={self._dtype}")
        self._given_scales: Optional[KVScales] = given
        self._headroom = kv_scale_headroom
        self._center_keys = center_keys_arg(kv_center_keys, "PagedKVCache")
        self._scales: Optional[PoolScales] = None  # the pools' float8 scales (set with the pools)
        if self._dtype is not None and is_fp8(self._dtype):
            PoolScales(self._dtype, self.num_layers, None, kv_scale_headroom)  # validates the headroom
        self._device = None if device is None else torch.device(device)
        self._pool_dtype: Optional[torch.dtype] = None
        self._step_md: Dict[tuple, object] = {}  # per-device copies of this step's metadata/index
        self.ops = KernelOps(backend)
        self._manager: Optional[KVCacheManager] = None
        self._pools: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._seq_ids: List[int] = []
        self._ids = itertools.count()
        self._seen = 0
        self._step: Optional[StepContext] = None  # the eager step in flight
        self._static: Optional[StaticDecodeBuffers] = None  # fixed-shape decode metadata
        #: layer -> (cos, sin) the layer's attention module applied in the latest step (kvmem.patch's
        #: pre-hooks record them, ``record_position_embeddings``); the step contexts share this dict
        self._position_embeddings: Dict[int, tuple] = {}
        self._released = False
        self._cascade = None  # shared-prefix decode: "auto" / "on" / "off", None = KVMEM_CASCADE (kvmem.patch(cascade=))
        self._pool = pool
        if pool is not None:
            if (pool.num_layers, pool.num_kv_heads, pool.head_dim, pool.block_size, pool.groups) != (
                    self.num_layers, self.num_kv_heads, self.head_dim, block_size, self.groups):
                raise ValueError("PagedKVCache: the KVPool was made for another model or block size")
            self._manager, self._pools, self._ids = pool.manager, pool.pools, pool.ids
            self._pool_dtype = pool.dtype
            if self._dtype is not None and self._dtype != pool.dtype:
                raise ValueError(f"PagedKVCache: kv_cache_dtype={self._dtype} but the KVPool holds {pool.dtype}")
            if given is not None:
                raise ValueError("PagedKVCache: a KVPool brings its own kv_scales (fixed for its life); pass them "
                                 "to the KVPool")
            self._scales = pool.scales
        self._bank = None  # the memory bank's state (kvmem.integrations.hf.memory.CacheBank)
        self._bank_group = next((g.name for g in self.groups if g.window is None), None)
        if memory_bank is not None:
            from kvmem.integrations.hf.memory import CacheBank

            if pool is not None:
                raise ValueError("PagedKVCache: memory_bank cannot share a KVPool (prefix caching) yet")
            if memory_bank.config.block_size != block_size:
                raise ValueError(f"PagedKVCache: block_size={block_size} must be the memory bank's block_size="
                                 f"{memory_bank.config.block_size}")
            self._bank = CacheBank(memory_bank, self.num_kv_heads, self.head_dim)
        super().__init__(layers=[_PagedLayer(self, i, w) for i, w in enumerate(self.windows)])

    # ------------------------------------------------------------------ description
    @property
    def group_names(self) -> List[str]:
        """Names of the layer groups (``"full"``, ``"sliding_<W>"``)."""
        return [g.name for g in self.groups]

    @property
    def manager(self) -> Optional[KVCacheManager]:
        """The ``KVCacheManager`` (None until the pools are allocated)."""
        return self._manager

    @property
    def pools(self) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """layer -> ``(k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return dict(self._pools)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.name}: {len(g.layers)} layers" for g in self.groups)
        state = "unallocated" if self._manager is None else f"{len(self._seq_ids)} rows, {self._seen} tokens"
        return f"PagedKVCache({self.model_type}, block_size={self.block_size}, {groups}; {state})"

    # ------------------------------------------------------------------ HF Cache API
    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length: columns fed so far (padding included), like ``DynamicCache``."""
        return self._seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        st = self._static
        if st is not None and st.active:  # a static step: constant (no host int that changes per step)
            return 0
        return self._seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> Tuple[int, int]:
        st = self._static
        if st is not None and st.active:  # kvmem's mask function needs no sizes; keep the graph constant
            return st.max_seqlen_k, 0
        return self._seen + int(query_length), 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    get_max_cache_shape = get_max_length  # transformers < 5.16

    @property
    def batch_size(self) -> int:
        return len(self._seq_ids) if self._seq_ids else -1

    @property
    def is_initialized(self) -> bool:
        return self._manager is not None

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> List[bool]:
        return [w is not None for w in self.windows]

    @property
    def is_linear(self) -> List[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> List[bool]:
        return [False] * self.num_layers

    def offload(self, *args, **kwargs) -> None:
        pass

    prefetch = offload

    def activate_past_recording(self) -> None:
        pass  # crop() can always roll back (blocks left of a sliding window are freed only past every query)

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return False

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        raise ValueError("PagedKVCache holds attention layers only; it has no linear-attention state")

    def early_initialization(self, batch_size: int, num_heads, head_dim, dtype: torch.dtype, device) -> None:
        """Allocate the pools now (otherwise done at the first ``update``)."""
        heads = num_heads if isinstance(num_heads, int) else set(num_heads)
        dims = head_dim if isinstance(head_dim, int) else set(head_dim)
        if heads not in (self.num_kv_heads, {self.num_kv_heads}) or dims not in (self.head_dim, {self.head_dim}):
            raise ValueError(f"PagedKVCache: built for {self.num_kv_heads} KV heads of dim {self.head_dim}, "
                             f"got num_heads={num_heads}, head_dim={head_dim}")
        if self._manager is None:
            self._allocate(batch_size, 0, dtype, torch.device(device), eager=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Stash this layer's new keys/values for kvmem's attention function (which writes them).

        Parameters
        ----------
        key_states, value_states: [batch, num_kv_heads, new_tokens, head_dim] (after RoPE)
        layer_idx: the layer

        Returns
        -------
        ``(key_states, value_states)`` unchanged; only ``attn_implementation="kvmem"`` can use them.
        """
        if self._released:
            raise RuntimeError("kvmem: this PagedKVCache was released: a later generate() call of its prefix-caching "
                               "model reuses the pool it lived in")
        st = self._static
        if st is not None and st.active:  # static decode step: the attention function writes (run_static)
            if key_states.shape[0] != st.rows or key_states.shape[2] != 1:
                raise ValueError(f"kvmem: a static decode step takes keys [{st.rows}, Hkv, 1, D], got "
                                 f"{tuple(key_states.shape)} for layer {layer_idx}")
            return key_states, value_states
        self._check_kv(key_states, value_states, layer_idx)
        step = self._step
        if step is None or layer_idx in step.updated:
            step = self._begin_step(key_states)
        elif step.pending:
            other = next(iter(step.pending))
            raise RuntimeError(
                f"kvmem: PagedKVCache.update ran for layer {layer_idx} but layer {other}'s keys were never "
                f"consumed: a PagedKVCache only works with attn_implementation='kvmem' (kvmem.patch(model) "
                f"or model.set_attn_implementation('kvmem')); this model uses "
                f"{getattr(self, '_attn_hint', 'another attention implementation')}")
        if key_states.shape[0] != step.batch or key_states.shape[2] != step.q_len:
            raise ValueError(f"kvmem: layer {layer_idx} got keys of shape {tuple(key_states.shape)} but this step "
                             f"has batch {step.batch} and {step.q_len} new tokens")
        step.updated.add(layer_idx)
        step.pending[layer_idx] = (key_states, value_states)
        context.enter(step)
        return key_states, value_states

    def reset(self) -> None:
        """Drop every sequence (the pools stay allocated). A step still in flight (interrupted
        half-way) is rolled back first, so blocks registered for it are never reused unwritten."""
        if self._step is not None:
            self._finish_step()
        if self._manager is not None:
            for s in self._seq_ids:
                self._manager.free_sequence(s)
        self._seq_ids, self._seen, self._step = [], 0, None
        if self._bank is not None:
            self._bank.reset()

    def release(self) -> None:
        """Free every sequence and refuse further use (the pool's registered prompt blocks stay cached)."""
        self.reset()
        self._released = True

    @property
    def kv_cache_dtype(self) -> Optional[torch.dtype]:
        """The pools' dtype (None until allocated, unless given)."""
        return self._pool_dtype or self._dtype

    @property
    def kv_scales(self) -> Optional[KVScales]:
        """The float8 pools' scales (``KVScales``, CPU copies), None when not quantised or not every
        layer's scales are fixed yet (the default rule fixes them at each layer's first write)."""
        return None if self._scales is None else self._scales.snapshot()

    def layer_scales(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, center: bool = True):
        """``(k_scale, v_scale)`` a layer's write and attention use (None, None for a float cache);
        ``k``/``v`` ``[T, Hkv, D]``: the tokens being written (the default rule's first write);
        ``center``: whether the layer may centre its keys (decided by its first write)."""
        return (None, None) if self._scales is None else self._scales.for_write(layer_idx, k, v, center)

    def layer_keys(self, layer_idx: int, k: torch.Tensor) -> torch.Tensor:
        """``k`` ``[T, Hkv, D]`` as the layer's pages store it (``PoolScales.centred``)."""
        return k if self._scales is None else self._scales.centred(layer_idx, k)

    @property
    def key_centers(self) -> Dict[int, Optional[torch.Tensor]]:
        """layer -> fixed key mean ``mu`` ``[Hkv, D]`` (CPU) or None (``PoolScales.centers``); {} if not fp8."""
        return {} if self._scales is None else self._scales.centers()

    # ------------------------------------------------------------------ memory
    def usage(self) -> Dict[str, GroupUsage]:
        """Per layer group: blocks used/free, tokens held, bytes held (``bytes_used``) and reserved
        (with a memory bank, the full-attention group's bytes include its pages' summaries)."""
        out = {} if self._manager is None else self._manager.usage()
        if self._bank is not None and self._bank_group in out:
            u, per = out[self._bank_group], self._bank.bytes_per_page()
            out[self._bank_group] = dataclasses.replace(
                u, bytes_used=None if u.bytes_used is None else u.bytes_used + per * u.blocks_used,
                bytes_total=None if u.bytes_total is None else u.bytes_total + per * u.num_blocks)
        return out

    def kv_bytes_held(self) -> int:
        """Bytes of the blocks in use, all groups, K and V."""
        return sum(u.bytes_used or 0 for u in self.usage().values())

    def kv_bytes_reserved(self) -> int:
        """Bytes of the allocated pools (and memory-bank summary pools)."""
        held = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._pools.values())
        return held + (0 if self._bank is None else self._bank.bytes_reserved())

    def row_lengths(self) -> List[int]:
        """KV length of each batch row (padding excluded)."""
        return [] if self._manager is None else [self._manager.seq_len(s) for s in self._seq_ids]

    # ------------------------------------------------------------------ internals
    def _check_kv(self, k, v, layer_idx) -> None:
        ok = (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4
              and k.shape[1] == self.num_kv_heads and k.shape[3] == self.head_dim and v.shape == k.shape
              and isinstance(layer_idx, int) and 0 <= layer_idx < self.num_layers)
        if not ok:
            got = f"key_states {tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}, " \
                  f"value_states {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            raise ValueError(
                f"kvmem: this PagedKVCache was built for a {self.model_type} model with {self.num_layers} layers, "
                f"{self.num_kv_heads} KV heads and head_dim {self.head_dim} (keys [batch, {self.num_kv_heads}, "
                f"tokens, {self.head_dim}]); got {got} for layer {layer_idx!r}. Is it a cache from another model? (A "
                f"model sharded by tensor parallelism: num_kv_heads=kvmem.integrations.hf.tp.rank_kv_heads(model))")
        pair = self._pools.get(layer_idx)
        if pair is not None and k.device != pair[0].device:
            raise ValueError(f"kvmem: layer {layer_idx} keys are on {k.device}, "
                             f"its PagedKVCache pools on {pair[0].device}")

    def _allocate(self, rows: int, step_len: int, dtype: torch.dtype, device: torch.device,
                  eager: bool = False) -> None:
        per_block = bytes_per_block(self.groups, self.block_size, self.num_kv_heads, self.head_dim, dtype)
        blocks = size_groups(self.groups, self.block_size, per_block, rows=rows, step_len=step_len,
                             num_blocks=self._num_blocks_arg, memory=self._memory,
                             max_batch_size=self._max_batch_size, max_cache_len=self._max_cache_len)
        if self._bank is not None and self._bank.attached_blocks:  # attached banks' pages, on top
            blocks = dict(blocks)
            blocks[self._bank_group] += self._bank.attached_blocks
        self._manager = KVCacheManager(blocks, self.block_size, self.groups, device, bytes_per_block=per_block)
        if self._bank is not None:
            self._bank.take_pages(self._manager.allocator(self._bank_group))
        self._pool_dtype = dtype
        if is_fp8(dtype):
            self._scales = PoolScales(dtype, self.num_layers, self._given_scales, self._headroom, self._center_keys)
        if self._device is not None or eager:
            self._pools = self._manager.make_pools(self.num_kv_heads, self.head_dim, dtype, device)
        # else: each layer's pools at its first update, on its keys' device (_layer_pools)

    def record_position_embeddings(self, layer_idx: int, position_embeddings) -> None:
        """Keep the ``(cos, sin)`` layer ``layer_idx``'s attention module applies this step (for the
        layer stages' ``LayerContext.position_embeddings``; keys are stored after RoPE)."""
        self._position_embeddings[layer_idx] = position_embeddings

    def _layer_pools(self, layer_idx: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        pair = self._pools.get(layer_idx)
        if pair is None:
            pair = self._manager.make_pools(self.num_kv_heads, self.head_dim, self._pool_dtype, device,
                                            layers=[layer_idx])[layer_idx]
            self._pools[layer_idx] = pair
        return pair
