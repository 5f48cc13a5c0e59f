"""``kvmem.PagedKVCache``: a transformers ``Cache`` whose keys/values live in kvmem's paged pools.

How a forward step runs
-----------------------
HF's attention modules call ``cache.update(k, v, layer_idx)`` and then the attention function
registered as ``"kvmem"`` (``hf_attention.kvmem_attention_forward``). The cache does not copy
anything in ``update``: it stashes the new ``k``/``v`` ``[B, Hkv, S, D]`` and returns them
unchanged. The attention function of the same layer then finds them here and calls
``PagedKVCache.attend``, which

1. on the step's first layer, *plans* the step: each batch row is a kvmem sequence; the 2D
   ``attention_mask`` (from kvmem's mask function: lengths/padding only, never an L x L mask) says
   which of the ``S`` new tokens of each row are real; ``KVCacheManager.plan`` reserves their slots
   (all or nothing: ``CacheFullError`` leaves the cache unchanged) and pending copy-on-write copies
   are applied to every layer's pools;
2. writes the layer's real tokens with ``cache_write`` (padding tokens get no slot and are never
   seen) and runs ``paged_attention`` for the layer's group (its sliding window, the module's
   softcap and sink logits).

A new step starts when a layer that was already updated is updated again. The logical length
grows when the step's last layer has attended; a step that stopped half-way (an exception inside
the forward) is rolled back at the start of the next one.

Lengths: ``get_seq_length()`` is the *logical* length (the number of columns HF has fed, padding
included, like ``DynamicCache``); each row's KV length excludes its padding.

Decode steps can also run *static* (``static_decode_step``, see ``kvmem.integrations.hf_static``):
the host plans before the forward and fills fixed-shape buffers in place, and the forward is device
work only, so it can be captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``
(``kvmem.integrations.DecodeGraphRunner`` / ``kvmem.patch(model, cuda_graph=True)`` do it for
``generate()``). One-token steps never read the attention mask back to the host: it is checked on
the device (``hf_static.check_decode_mask``).

Beam search (``reorder_cache``), ``batch_select_indices`` and ``batch_repeat_interleave`` permute
rows with ``KVCacheManager.fork`` / ``free_sequence``: rows share blocks, and the first write into a
shared, partly filled block copies it (copy-on-write). ``crop`` (assisted decoding) truncates every
row.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvmem.cache import GroupUsage, KVCacheManager, LayerGroupSpec, page_bytes
from kvmem.cache.metadata import StepMetadata
from kvmem.integrations import families
from kvmem.integrations import hf_static
from kvmem.ops.kernel_ops import KernelOps

__all__ = ["PagedKVCache", "KVPool", "parse_memory", "size_groups", "needed_blocks", "bytes_per_block"]

_tls = threading.local()  # .cache: weakref to the PagedKVCache whose update() ran last in this thread
_MIN_STEP_ALLOWANCE = 64  # tokens one later step (assisted decoding) may add, for sizing sliding groups


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def current_cache() -> Optional["PagedKVCache"]:
    """The PagedKVCache whose ``update`` ran last in this thread (None if gone)."""
    ref = getattr(_tls, "cache", None)
    return ref() if ref is not None else None


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


class _Step:
    """State of the forward step in flight."""

    __slots__ = ("batch", "q_len", "updated", "pending", "done", "plan", "index", "prev_lens")

    def __init__(self, batch: int, q_len: int):
        self.batch, self.q_len = batch, q_len
        self.updated = set()  # layers whose update() ran this step
        self.pending = {}  # layer -> (k, v) returned by update() and not yet attended
        self.done = set()  # layers attended (written + attention run)
        self.plan = None  # the StepPlan, once planned
        self.index = None  # [num_real] int64 indices of the real tokens in [B*S], None = all real
        self.prev_lens = None  # per row KV lengths before the step (for rollback)


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


class PagedKVCache(Cache):
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
                 pool: Optional["KVPool"] = None):
        families.resolve(config)
        tc = families.text_config(config)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"PagedKVCache: block_size must be an int >= 1, got {block_size!r}")
        self.model_type = getattr(tc, "model_type", "?")
        self.num_layers, self.num_kv_heads, self.head_dim = families.kv_dims(config)
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
        self._dtype = dtype
        self._device = None if device is None else torch.device(device)
        self._pool_dtype: Optional[torch.dtype] = None
        self._step_md: Dict[tuple, object] = {}  # per-device copies of this step's metadata/index
        self.ops = KernelOps(backend)
        self._manager: Optional[KVCacheManager] = None
        self._pools: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._seq_ids: List[int] = []
        self._ids = itertools.count()
        self._seen = 0
        self._step: Optional[_Step] = None
        self._static: Optional[hf_static.StaticDecodeBuffers] = None  # fixed-shape decode metadata
        self._released = False
        self._pool = pool
        if pool is not None:
            if (pool.num_layers, pool.num_kv_heads, pool.head_dim, pool.block_size, pool.groups) != (
                    self.num_layers, self.num_kv_heads, self.head_dim, block_size, self.groups):
                raise ValueError("PagedKVCache: the KVPool was made for another model or block size")
            self._manager, self._pools, self._ids = pool.manager, pool.pools, pool.ids
            self._pool_dtype = pool.dtype
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

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.16
        return -1

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

    def prefetch(self, *args, **kwargs) -> None:
        pass

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
        if st is not None and st.active:  # static decode step: device work only (see hf_static)
            if key_states.shape[0] != st.rows or key_states.shape[2] != 1:
                raise ValueError(f"kvmem: a static decode step takes keys [{st.rows}, Hkv, 1, D], got "
                                 f"{tuple(key_states.shape)} for layer {layer_idx}")
            st.write(layer_idx, key_states, value_states)
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
        _tls.cache = weakref.ref(self)
        return key_states, value_states

    def reset(self) -> None:
        """Drop every sequence (the pools stay allocated)."""
        if self._manager is not None:
            for s in self._seq_ids:
                self._manager.free_sequence(s)
        self._seq_ids, self._seen, self._step = [], 0, None

    def release(self) -> None:
        """Free every sequence and refuse further use (the pool's registered prompt blocks stay cached)."""
        self.reset()
        self._released = True

    def reuse_prefix(self, rows_tokens: List[List[int]], pads: Optional[List[int]] = None) -> int:
        """Start the rows from cached blocks of their prompts (before the first step).

        Parameters
        ----------
        rows_tokens: per row, the prompt's real token ids (padding excluded)
        pads: per row, how many padding columns precede them (left padding), default 0

        Returns
        -------
        the number of leading columns now cached for every row (``get_seq_length()``); generate()
        then feeds only the rest of the prompt. Each row's prompt blocks are registered for reuse
        when the step that fills them is planned.
        """
        if self._seq_ids or self._seen or self._step is not None:
            raise RuntimeError("kvmem: reuse_prefix must be called on an empty PagedKVCache")
        if self._manager is None:
            raise RuntimeError("kvmem: reuse_prefix needs allocated pools (a KVPool)")
        pads = [0] * len(rows_tokens) if pads is None else list(pads)
        m = self._manager
        cached = []
        for toks in rows_tokens:
            sid = next(self._ids)
            cached.append(m.add_sequence(sid, [int(t) for t in toks]))
            self._seq_ids.append(sid)
        while True:  # every row must hold exactly (cols - its padding) tokens
            cols = min(p + c for p, c in zip(pads, cached)) if cached else 0
            if cols < max(pads, default=0):  # a row's padding would have to be cached: no reuse
                cols = 0
            settled = True
            for i, (sid, p, toks) in enumerate(zip(self._seq_ids, pads, rows_tokens)):
                keep = max(0, cols - p)
                if cached[i] <= keep:
                    continue
                try:
                    m.truncate(sid, keep)
                    cached[i] = keep
                except ValueError:  # a sliding group already dropped what a query at `keep` sees
                    m.free_sequence(sid)
                    cached[i] = m.add_sequence(sid, [int(t) for t in toks[: keep + 1]])
                    settled &= cached[i] == keep
            if settled:
                break
        self._seen = cols
        return cols

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row (a positive value is the new
        absolute length, transformers' legacy convention)."""
        self._finish_step()
        n = int(tokens_to_remove)
        if n > 0:
            n = -(self._seen - n) if n < self._seen else 0
        if n == 0:
            return
        n = -n
        if n > self._seen:
            raise ValueError(f"kvmem: cannot crop {n} tokens from a cache of {self._seen}")
        m = self._manager
        lens = [m.seq_len(s) for s in self._seq_ids]
        if any(L < n for L in lens):
            raise ValueError(f"kvmem: cannot crop {n} tokens: a row holds only {min(lens)} (padding is not stored)")
        for s, L in zip(self._seq_ids, lens):
            m.truncate(s, L - n)
        self._seen -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``r`` becomes old row ``beam_idx[r]`` (blocks shared, copy-on-write)."""
        self._reindex([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex([r for r in range(len(self._seq_ids)) for _ in range(int(repeats))])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._reindex([int(i) for i in idx.tolist()])

    # ------------------------------------------------------------------ memory
    def usage(self) -> Dict[str, GroupUsage]:
        """Per layer group: blocks used/free, tokens held, bytes held (``bytes_used``) and reserved."""
        return {} if self._manager is None else self._manager.usage()

    def kv_bytes_held(self) -> int:
        """Bytes of the blocks in use, all groups, K and V."""
        return sum(u.bytes_used or 0 for u in self.usage().values())

    def kv_bytes_reserved(self) -> int:
        """Bytes of the allocated pools."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._pools.values())

    def row_lengths(self) -> List[int]:
        """KV length of each batch row (padding excluded)."""
        return [] if self._manager is None else [self._manager.seq_len(s) for s in self._seq_ids]

    # ------------------------------------------------------------------ static decode steps
    @contextlib.contextmanager
    def static_decode_step(self, attention_mask: Optional[torch.Tensor] = None):
        """Run one decode step (one new token per row) with fixed-shape metadata.

        The host half runs on entering: the allocator reserves this step's slots (``CacheFullError``
        leaves the cache unchanged), copy-on-write copies are applied and the step's metadata is
        copied in place into persistent buffers (``kvmem.integrations.hf_static``). Inside the block,
        call the model's forward with ``attention_mask=None`` and explicit ``position_ids``
        ``[rows, 1]``: ``update`` and the ``"kvmem"`` attention then do device work only, with no
        Python branching on tensor values and no host int that changes between steps, so the
        forward can be captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``
        without recompiles. On leaving, the step counts (``get_seq_length()`` grows by one); if the
        block raised, the step is rolled back.

        Parameters
        ----------
        attention_mask: None or the step's 2D mask ``[rows, seen + 1]`` (``generate()``'s): checked on
            the device (its new column real, earlier columns matching the rows' lengths), never read
            back to the host

        Yields
        ------
        the ``StaticDecodeBuffers`` (same object every step of a batch size)

        Raises
        ------
        RuntimeError
            before the first (prefill) step, or when the layers' pools are on several devices
        ValueError
            when a row would outgrow the buffers (``max_cache_len`` the cache was made for)
        """
        st, prev = self._prepare_static(attention_mask)
        hf_static._set_active(st)
        st.active = True
        ok = False
        try:
            yield st
            ok = True
        finally:
            st.active = False
            hf_static._set_active(None)
            if ok:
                self._seen += 1
            else:
                self._rollback(prev)

    def pools_device(self) -> Optional[torch.device]:
        """The one device of every layer's pools, or None (pools not all allocated, or on several
        devices: a model split over GPUs), which static decode steps cannot run."""
        devices = {k.device for k, _ in self._pools.values()}
        if len(self._pools) < self.num_layers or len(devices) != 1:
            return None
        return next(iter(devices))

    def _static_width(self) -> int:
        """Blocks per row the static buffers address: the cache's ``max_cache_len`` (+1 block)."""
        bs = self.block_size
        if self._max_cache_len is not None:
            return _cdiv(int(self._max_cache_len) + 1, bs) + 1
        full = [self._manager.allocator(g.name).num_blocks for g in self.groups if g.window is None]
        if not full:
            raise ValueError("kvmem: static decode of a sliding-window-only model needs a PagedKVCache made with "
                             "max_cache_len= (generate() passes it)")
        return max(full)

    @torch.compiler.disable  # host-side bookkeeping: never traced
    def _prepare_static(self, mask: Optional[torch.Tensor]):
        if self._released:
            raise RuntimeError("kvmem: this PagedKVCache was released")
        if hf_static.active() is not None:
            raise RuntimeError("kvmem: a static decode step is already in flight")
        self._finish_step()
        m = self._manager
        if m is None or not self._seq_ids or self._seen == 0:
            raise RuntimeError("kvmem: a static decode step continues a prefilled PagedKVCache; run the prompt "
                               "through the model first")
        B = len(self._seq_ids)
        device = self.pools_device()
        if device is None:
            devices = {k.device for k, _ in self._pools.values()}
            raise RuntimeError(f"kvmem: static decode steps need every layer's pools on one device "
                               f"(got {sorted(map(str, devices))} for {len(self._pools)} of {self.num_layers} layers)")
        st = self._static
        if st is None or st.rows != B or st.device != device:
            width = self._static_width()
            key = (B, width, device)
            st = None if self._pool is None else self._pool.static.get(key)
            if st is None:  # a pool's buffers outlive this cache: graphs captured on them stay valid
                st = hf_static.StaticDecodeBuffers(self.groups, self.num_layers, B, width, self.block_size, device,
                                                   self.ops)
                if self._pool is not None:
                    self._pool.static[key] = st
            st.ops = self.ops
            self._static = st
        st.pools = dict(self._pools)
        if mask is not None:
            self._check_mask_shape(mask, B, 1)
        prev = [m.seq_len(s) for s in self._seq_ids]
        need = max(prev) + 1
        if need > st.max_seqlen_k:
            raise ValueError(f"kvmem: a row reaches {need} tokens but this PagedKVCache's static decode buffers hold "
                             f"{st.max_seqlen_k} per row (make the cache with a larger max_cache_len)")
        plan = m.plan(self._seq_ids, [1] * B, device, max_blocks_per_seq=st.width)  # CacheFullError: unchanged
        if plan.copies:
            m.apply_copies(self._pools)
        st.fill(plan)
        if mask is not None:
            self._check_decode_mask(mask, st.seq_lens, prev)
        return st, prev

    def _check_mask_shape(self, mask, rows: int, new_tokens: int) -> None:
        """``mask`` must be ``[rows, seen + new_tokens]`` (generate()'s 2D padding mask)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != rows:
            raise ValueError(f"kvmem: expected a 2D attention mask [batch={rows}, tokens], got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape[1] != self._seen + new_tokens:
            raise ValueError(f"kvmem: the attention mask has {mask.shape[1]} columns but the cache has seen "
                             f"{self._seen} tokens and this step adds {new_tokens}")

    def _check_decode_mask(self, mask: torch.Tensor, seq_lens: torch.Tensor, prev: List[int]) -> None:
        """Device-side check of a 1-token step's mask (``hf_static.check_decode_mask``), the step's
        reservation already made: on CPU a failure rolls it back to ``prev`` and raises ValueError;
        on a GPU it is a device assert."""
        try:
            hf_static.check_decode_mask(mask, seq_lens)
        except RuntimeError as e:  # CPU: raised at once; undo the reservation
            self._rollback(prev)
            if mask.device.type != "cpu":
                raise
            raise ValueError(str(e)) from None

    def _rollback(self, prev: List[int]) -> None:
        """Truncate every row back to ``prev`` (a step that did not complete)."""
        for s, L in zip(self._seq_ids, prev):
            if self._manager.seq_len(s) > L:
                self._manager.truncate(s, L)
        if self._pool is not None:  # blocks registered at plan time were never (fully) written
            self._manager.reset_prefix_cache()

    # ------------------------------------------------------------------ kvmem attention
    def owns(self, layer_idx, key: torch.Tensor) -> bool:
        """Whether ``key`` is what ``update`` returned for ``layer_idx`` in the step in flight."""
        step = self._step
        if step is None or layer_idx not in step.pending:
            return False
        return step.pending[layer_idx][0] is key

    def attend(self, layer_idx: int, query: torch.Tensor, attention_mask: Optional[torch.Tensor], *,
               scale: float, window: Optional[int], softcap: Optional[float],
               sink_logits: Optional[torch.Tensor]) -> torch.Tensor:
        """Write the layer's stashed keys/values and run paged attention (see the module docstring).

        Parameters
        ----------
        query: [batch, num_heads, new_tokens, head_dim]
        attention_mask: [batch, seen + new_tokens] bool (True = real token) or None (no padding)
        window: the module's sliding window; must be the window of the layer's group

        Returns
        -------
        out: [batch, new_tokens, num_heads, head_dim] (0 at padding positions)
        """
        step = self._step
        key, value = step.pending.pop(layer_idx)
        if step.plan is None:
            try:
                self._plan(step, attention_mask)
            except BaseException:
                step.pending[layer_idx] = (key, value)
                raise
        md = step.plan.for_layer(layer_idx)
        k_cache, v_cache = self._layer_pools(layer_idx, key.device)
        if k_cache.device != md.device:  # a layer on another GPU: its own copy of the metadata, once a step
            ck = (step.plan.layer_to_group[layer_idx], k_cache.device)
            if ck not in self._step_md:
                self._step_md[ck] = md.to(k_cache.device)
            md = self._step_md[ck]
        if window != md.window:
            raise ValueError(
                f"kvmem: layer {layer_idx} attends with sliding_window={window} but this PagedKVCache was built "
                f"with window {md.window} for it (from the config's layer_types/sliding_window); was the cache made "
                f"for another model?")
        B, Hq, S, D = query.shape
        index = step.index
        if index is not None and index.device != query.device:
            ck = ("index", query.device)
            if ck not in self._step_md:
                self._step_md[ck] = index.to(query.device, non_blocking=True)
            index = self._step_md[ck]
        q = hf_static.tokens(query, index)
        k = hf_static.tokens(key, index)
        v = hf_static.tokens(value, index)
        if k.dtype != k_cache.dtype:
            raise TypeError(f"kvmem: layer {layer_idx} writes {k.dtype} keys into a {k_cache.dtype} PagedKVCache")
        self.ops.cache_write(k, v, k_cache, v_cache, md.slot_mapping)
        out = self.ops.paged_attention(q, k_cache, v_cache, md.block_table, md.seq_lens, md.cu_seqlens_q,
                                       md.max_seqlen_q, md.max_seqlen_k, scale=scale, window=md.window,
                                       softcap=softcap, sink_logits=sink_logits)
        step.done.add(layer_idx)
        if len(step.done) == self.num_layers:
            self._seen += S  # the step is complete
        if index is not None:
            full = out.new_zeros(B * S, Hq, D)
            full.index_copy_(0, index, out)
            out = full
        return out.view(B, S, Hq, D)

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
                f"tokens, {self.head_dim}]); got {got} for layer {layer_idx!r}. Is it a cache from another model?")
        pair = self._pools.get(layer_idx)
        if pair is not None and k.device != pair[0].device:
            raise ValueError(f"kvmem: layer {layer_idx} keys are on {k.device}, "
                             f"its PagedKVCache pools on {pair[0].device}")

    @torch.compiler.disable  # host-side bookkeeping: never traced (torch.compile'd models)
    def _begin_step(self, key: torch.Tensor) -> _Step:
        self._finish_step()
        B, _, S, _ = key.shape
        if self._manager is None:
            self._allocate(B, S, self._dtype or key.dtype, self._device or key.device)
        self._step = _Step(B, S)
        return self._step

    @torch.compiler.disable  # host-side bookkeeping: never traced (torch.compile'd models)
    def _finish_step(self) -> None:
        """Close the step in flight; roll it back if it stopped half-way."""
        step, self._step = self._step, None
        if step is None or step.plan is None or len(step.done) == self.num_layers:
            return
        self._rollback(step.prev_lens)

    @torch.compiler.disable  # host-side bookkeeping: never traced (torch.compile'd models)
    def _plan(self, step: _Step, mask: Optional[torch.Tensor]) -> None:
        B, S = step.batch, step.q_len
        m = self._manager
        if not self._seq_ids:
            for _ in range(B):
                sid = next(self._ids)
                m.add_sequence(sid)
                self._seq_ids.append(sid)
        elif len(self._seq_ids) != B:
            raise ValueError(f"kvmem: the batch changed from {len(self._seq_ids)} to {B} rows; change it with "
                             f"reorder_cache / batch_select_indices / batch_repeat_interleave")
        prev = [m.seq_len(s) for s in self._seq_ids]
        nums, index = [S] * B, None
        if mask is not None:
            self._check_mask_shape(mask, B, S)
            N = mask.shape[1]
            if S == 1:  # decode: check on the device, never read the mask back (no host sync)
                plan = m.plan(self._seq_ids, nums)  # CacheFullError: nothing changed
                self._check_decode_mask(mask, plan.groups[self.groups[0].name].seq_lens, prev)
                self._commit_plan(step, plan, None, prev)
                return
            mask = mask.to(torch.bool)
            new = mask[:, N - S:]
            counts = torch.stack([new.sum(1), mask[:, : N - S].sum(1)]).cpu().tolist()
            nums, past = counts
            if past != prev:
                raise ValueError(
                    f"kvmem: the attention mask marks {past} earlier real tokens per row but the cache holds "
                    f"{prev}: kvmem drops padding when tokens are added and cannot mask tokens it already holds")
            if any(n != S for n in nums):
                index = new.reshape(-1).nonzero().flatten()
        plan = m.plan(self._seq_ids, nums)  # CacheFullError: nothing changed
        self._commit_plan(step, plan, index, prev)

    def _commit_plan(self, step: _Step, plan, index, prev: List[int]) -> None:
        m = self._manager
        self._step_md = {}
        if plan.copies:
            for layer in range(self.num_layers):  # copy-on-write needs every layer's pools
                self._layer_pools(layer, m.device)
            m.apply_copies(self._pools)
        step.plan, step.index, step.prev_lens = plan, index, prev

    def _reindex(self, rows: List[int]) -> None:
        """New row ``r`` = old row ``rows[r]`` (fork, then free the old rows)."""
        self._finish_step()
        old = self._seq_ids
        if not old:
            if rows:
                raise ValueError("kvmem: cannot reorder an empty PagedKVCache")
            return
        if any(not 0 <= r < len(old) for r in rows):
            raise IndexError(f"kvmem: row index out of range for a batch of {len(old)}: {rows}")
        if rows == list(range(len(old))):
            return
        m = self._manager
        new = []
        for r in rows:
            sid = next(self._ids)
            m.fork(old[r], sid)
            new.append(sid)
        for s in old:
            m.free_sequence(s)
        self._seq_ids = new

    def _allocate(self, rows: int, step_len: int, dtype: torch.dtype, device: torch.device,
                  eager: bool = False) -> None:
        per_block = bytes_per_block(self.groups, self.block_size, self.num_kv_heads, self.head_dim, dtype)
        blocks = size_groups(self.groups, self.block_size, per_block, rows=rows, step_len=step_len,
                             num_blocks=self._num_blocks_arg, memory=self._memory,
                             max_batch_size=self._max_batch_size, max_cache_len=self._max_cache_len)
        self._manager = KVCacheManager(blocks, self.block_size, self.groups, device, bytes_per_block=per_block)
        self._pool_dtype = dtype
        if self._device is not None or eager:
            self._pools = self._manager.make_pools(self.num_kv_heads, self.head_dim, dtype, device)
        # else: each layer's pools at its first update, on its keys' device (_layer_pools)

    def _layer_pools(self, layer_idx: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        pair = self._pools.get(layer_idx)
        if pair is None:
            pair = self._manager.make_pools(self.num_kv_heads, self.head_dim, self._pool_dtype, device,
                                            layers=[layer_idx])[layer_idx]
            self._pools[layer_idx] = pair
        return pair


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
            per_row = min(full, _cdiv(g.window - 1 + max(step_len, _MIN_STEP_ALLOWANCE), block_size) + 2)
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


class KVPool:
    """Paged K/V pools and their ``KVCacheManager``, shared by successive ``PagedKVCache`` objects
    (``kvmem.patch(model, prefix_cache=True)``: full prompt blocks of one ``generate()`` call are
    reused by later calls with the same prefix).

    Parameters
    ----------
    config: the model config
    block_size: tokens per block
    num_blocks: group name -> blocks
    dtype, device: of the pools; ``device`` may map layer -> device (a model split over GPUs)
    """

    def __init__(self, config, block_size: int, num_blocks: Dict[str, int], dtype: torch.dtype,
                 device: Union[str, torch.device, Mapping[int, Union[str, torch.device]]]):
        self.num_layers, self.num_kv_heads, self.head_dim = families.kv_dims(config)
        self.groups = tuple(LayerGroupSpec(n, layers, w)
                            for n, layers, w in families.group_layers(families.layer_windows(config)))
        self.layer_devices = ({int(k): torch.device(v) for k, v in device.items()}
                              if isinstance(device, Mapping) else None)
        self.block_size, self.dtype = block_size, dtype
        self.device = self.layer_devices.get(0) if self.layer_devices else torch.device(device)
        per_block = bytes_per_block(self.groups, block_size, self.num_kv_heads, self.head_dim, dtype)
        self.manager = KVCacheManager(dict(num_blocks), block_size, self.groups, self.device,
                                      bytes_per_block=per_block)
        self.pools = self.manager.make_pools(self.num_kv_heads, self.head_dim, dtype,
                                             self.layer_devices or self.device)
        self.ids = itertools.count()
        self.live: Optional["PagedKVCache"] = None  # the cache currently using the pool
        #: (rows, width, device) -> StaticDecodeBuffers shared by the caches living in this pool
        self.static: Dict[tuple, hf_static.StaticDecodeBuffers] = {}

    @property
    def num_blocks(self) -> Dict[str, int]:
        return {g.name: self.manager.allocator(g.name).num_blocks for g in self.groups}

    def fits(self, need: Dict[str, int]) -> bool:
        nb = self.num_blocks
        return all(nb.get(k, 0) >= v for k, v in need.items())
