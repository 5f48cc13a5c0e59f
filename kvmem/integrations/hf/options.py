"""``KvmemOptions``: what ``kvmem.patch`` stores on a model for ``generate()`` to build its cache."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from kvmem.cache import KVPool, parse_memory
from kvmem.cache.scales import DEFAULT_CENTER_KEYS, DEFAULT_HEADROOM, KVScales, PoolScales, as_kv_scales, kv_cache_dtype
from kvmem.ops._common import is_fp8
from kvmem.ops.kernel_ops import check_backend

__all__ = ["KvmemOptions", "options_of", "check_args", "check_kv_args"]


@dataclass
class KvmemOptions:
    """Options ``generate()`` uses to build a model's ``PagedKVCache`` (see ``kvmem.patch``).

    Attributes
    ----------
    backend, block_size, num_blocks, memory, prefix_cache, cuda_graph, compile_decode: ``kvmem.patch``'s
    memory_bank: the resolved memory bank (``BankSpec``), None without one
    kv_cache_dtype: the pools' dtype (a torch dtype), None = the model's
    kv_scales: a float8 cache's ``KVScales``, None = the default rule (``kvmem.cache.scales``)
    kv_scale_headroom: that rule's headroom
    kv_center_keys: a float8 cache's key centring (``kvmem.cache.scales``, "Key centring")
    cascade: shared-prefix decode, ``"auto"`` / ``"on"`` / ``"off"``, None = ``KVMEM_CASCADE``
        (``kvmem.integrations.hf.cascade.option``)
    pool: the ``KVPool`` kept across calls (``prefix_cache`` / ``cuda_graph``)
    prompt: ``(input_ids, attention_mask)`` of the ``generate()`` call in flight, set by the
        generate wrapper of a prefix-caching / CUDA-graph model for the cache hook (explicit
        state of this model's options, not a thread-local)
    prefix_report: the ``PrefixReport`` of the latest call of a prefix-caching model (also
        ``model._kvmem_prefix_report``)
    """

    backend: str = "auto"
    block_size: int = 16
    num_blocks: Union[None, int, Mapping] = None
    memory: Union[None, int, str] = None
    prefix_cache: bool = False
    cuda_graph: bool = False
    compile_decode: Union[None, bool, dict] = None
    pool: Optional[KVPool] = field(default=None, repr=False)
    prompt: Optional[tuple] = field(default=None, repr=False)
    memory_bank: Optional[object] = None  # kvmem.integrations.hf.memory.BankSpec
    prefix_report: Optional[object] = field(default=None, repr=False)  # kvmem.integrations.hf.chain.PrefixReport
    kv_cache_dtype: Optional[torch.dtype] = None
    kv_scales: Optional[KVScales] = field(default=None, repr=False)
    kv_scale_headroom: float = DEFAULT_HEADROOM
    kv_center_keys: bool = DEFAULT_CENTER_KEYS
    cascade: Optional[str] = None


def options_of(model) -> KvmemOptions:
    """The options ``kvmem.patch`` stored on ``model`` (defaults when it was not patched)."""
    return getattr(model, "_kvmem_options", None) or KvmemOptions()


def check_args(backend, block_size, num_blocks, memory, prefix_cache, cuda_graph, compile_decode):
    """Validate ``kvmem.patch``'s options; returns ``(backend, block_size)`` normalised."""
    backend = check_backend(backend)
    try:
        if isinstance(block_size, bool):
            raise TypeError
        block_size = operator.index(block_size)
    except TypeError:
        raise TypeError(f"kvmem.patch: block_size must be an int, got {type(block_size).__name__}") from None
    if block_size < 1:
        raise ValueError(f"kvmem.patch: block_size must be >= 1, got {block_size}")
    if num_blocks is not None and not isinstance(num_blocks, Mapping):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"kvmem.patch: num_blocks must be None, an int >= 1 or a mapping, got {num_blocks!r}")
    if memory is not None:
        parse_memory(memory)
    if not isinstance(prefix_cache, bool):
        raise TypeError(f"kvmem.patch: prefix_cache must be a bool, got {type(prefix_cache).__name__}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"kvmem.patch: cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if compile_decode is not None and not isinstance(compile_decode, (bool, dict)):
        raise TypeError(f"kvmem.patch: compile_decode must be None, a bool or a dict of torch.compile options, "
                        f"got {type(compile_decode).__name__}")
    return backend, block_size


def check_kv_args(kv_dtype, kv_scales, kv_scale_headroom, num_layers: int, num_kv_heads):
    """Validate ``kvmem.patch``'s ``kv_cache_dtype`` / ``kv_scales`` / ``kv_scale_headroom`` for a model of
    ``num_layers`` layers and ``num_kv_heads`` KV heads (or a tuple of the counts allowed: under tensor
    parallelism the model's and the rank's); returns ``(dtype or None, KVScales or None)``."""
    dtype = kv_cache_dtype(kv_dtype, "kvmem.patch")
    scales = as_kv_scales(kv_scales, num_layers, num_kv_heads, "kvmem.patch")
    fp8 = dtype is not None and is_fp8(dtype)
    if scales is not None and not fp8:
        raise ValueError(f"kvmem.patch: kv_scales are for float8 caches (kv_cache_dtype='fp8_e4m3' or 'fp8_e5m2'), "
                         f"got kv_cache_dtype={kv_dtype!r}")
    if fp8:
        PoolScales(dtype, num_layers, None, kv_scale_headroom)  # validates the headroom
    return dtype, scales
