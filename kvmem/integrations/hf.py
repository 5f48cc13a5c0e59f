"""``kvmem.patch`` / ``kvmem.unpatch``: run a Hugging Face causal LM on kvmem's paged KV cache.

>>> model = kvmem.patch(model)                      # attention -> "kvmem", generate() -> PagedKVCache
>>> out = model.generate(**inputs, max_new_tokens=64)
>>> kvmem.unpatch(model)                            # exactly the original behaviour again
>>> kvmem.patch(model, cuda_graph=True)            # decode steps replayed from CUDA graphs (on CUDA)

Equivalently, after ``kvmem.integrations.hf.register()`` (``kvmem.patch`` calls it),
``from_pretrained(..., attn_implementation="kvmem")`` or ``model.set_attn_implementation("kvmem")``
give the same ``generate()`` behaviour with default options.
"""

from __future__ import annotations

import operator
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from kvmem.cache import LayerGroupSpec

from kvmem.integrations import families
from kvmem.ops.kernel_ops import KernelOps, check_backend
from kvmem.integrations.hf_attention import (ATTN_NAME, instance_generate_hook, register, uses_kvmem)
from kvmem.integrations.hf_cache import KVPool, PagedKVCache, bytes_per_block, parse_memory, size_groups

__all__ = ["patch", "unpatch", "is_patched", "KvmemOptions", "options_of", "register"]

_MISSING = object()


_prompt_tls = threading.local()  # .prompt: (input_ids, attention_mask) of the generate() call in flight


@dataclass
class KvmemOptions:
    """Options ``generate()`` uses to build a model's ``PagedKVCache`` (see ``kvmem.patch``)."""

    backend: str = "auto"
    block_size: int = 16
    num_blocks: Union[None, int, Mapping] = None
    memory: Union[None, int, str] = None
    prefix_cache: bool = False
    cuda_graph: bool = False
    compile_decode: Union[None, bool, dict] = None
    pool: Optional[KVPool] = field(default=None, repr=False)  # prefix_cache / cuda_graph: pools kept across calls

    def make_cache(self, model, *, max_batch_size: Optional[int] = None, max_cache_len: Optional[int] = None,
                   expand: int = 1) -> PagedKVCache:
        """A ``PagedKVCache`` for one ``generate()`` call of ``max_batch_size`` prompts (each expanded to
        ``expand`` rows: beams / return sequences) of up to ``max_cache_len`` tokens.

        With ``prefix_cache`` the cache lives in a ``KVPool`` kept across calls (the previous call's
        cache is released) and starts from the cached blocks of its prompts' longest known prefix.
        With ``cuda_graph`` it lives in a kept ``KVPool`` too, so that the pools and the static
        decode buffers (``KVPool.static``) -- the memory captured CUDA graphs point at -- outlive
        the call and the next call of the same batch size and length replays the same graphs.
        """
        kw = dict(block_size=self.block_size, backend=self.backend)
        rows = (max_batch_size or 1) * expand
        if not (self.prefix_cache or self.cuda_graph):
            return PagedKVCache(model.config, num_blocks=self.num_blocks, memory=self.memory,
                                max_batch_size=rows, max_cache_len=max_cache_len, **kw)
        prompt = getattr(_prompt_tls, "prompt", None)
        rows_tokens, pads = _prompt_rows(prompt, max_batch_size, expand)
        dtype, device = model.dtype, model_layer_devices(model) or model.device
        _, kv_heads, head_dim = families.kv_dims(model.config)
        groups = [LayerGroupSpec(n, layers, w)
                  for n, layers, w in families.group_layers(families.layer_windows(model.config))]
        per_block = bytes_per_block(groups, self.block_size, kv_heads, head_dim, dtype)
        if rows_tokens:
            step_len = max((len(t) + p for t, p in zip(rows_tokens, pads)), default=0)
        else:  # prompt unknown: size sliding groups for a prompt of the whole length
            step_len = max_cache_len or 0
        auto = self.num_blocks is None and self.memory is None
        want = size_groups(groups, self.block_size, per_block, rows=rows, step_len=step_len,
                           num_blocks=self.num_blocks,
                           memory=None if self.memory is None else parse_memory(self.memory),
                           max_cache_len=max_cache_len)
        pool = self.pool
        if pool is not None and pool.live is not None:
            pool.live.release()
        same_place = pool is not None and ((pool.layer_devices == device) if isinstance(device, dict) else
                                           (pool.layer_devices is None and pool.device == torch.device(device)))
        if pool is None or pool.dtype != dtype or not same_place or (auto and not pool.fits(want)):
            # auto-sized: room for this call (and with prefix_cache as much again of cached prompt blocks)
            blocks = {k: 2 * v for k, v in want.items()} if auto and self.prefix_cache else want
            pool = self.pool = KVPool(model.config, self.block_size, blocks, dtype, device)
        cache = PagedKVCache(model.config, pool=pool, max_cache_len=max_cache_len, **kw)
        pool.live = cache
        if rows_tokens and self.prefix_cache:
            cache.reuse_prefix(rows_tokens, pads)
        return cache


def model_layer_devices(model) -> Optional[Dict[int, torch.device]]:
    """layer -> device of its attention weights when the model is split over several devices
    (``device_map=...``), else None. Layers whose weights are offloaded (meta) use accelerate's
    execution device."""
    out: Dict[int, torch.device] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if not isinstance(idx, int) or isinstance(idx, bool) or idx in out:
            continue
        p = next(m.parameters(), None)
        dev = None if p is None else p.device
        if dev is None or dev.type == "meta":
            hook = getattr(m, "_hf_hook", None)
            ex = getattr(hook, "execution_device", None)
            dev = None if ex is None else torch.device(ex)
        if dev is not None:
            out[idx] = dev
    return out if len(set(out.values())) > 1 else None


def _prompt_rows(prompt, batch: Optional[int], expand: int) -> Tuple[Optional[List[List[int]]], List[int]]:
    """Per (expanded) row: the prompt's real token ids and its left-padding count; None if unknown."""
    if prompt is None:
        return None, []
    ids, mask = prompt
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or (batch is not None and ids.shape[0] != batch):
        return None, []
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return None, []
    mask = mask.bool().cpu()
    ids = ids.cpu()
    rows, pads = [], []
    for b in range(ids.shape[0]):
        p = int((~mask[b]).sum())
        if not bool(mask[b, p:].all()):  # not left padding: no prefix reuse
            return None, []
        for _ in range(expand):
            rows.append(ids[b, p:].tolist())
            pads.append(p)
    return rows, pads


def options_of(model) -> KvmemOptions:
    """The options ``kvmem.patch`` stored on ``model`` (defaults when it was not patched)."""
    return getattr(model, "_kvmem_options", None) or KvmemOptions()


@dataclass
class _PatchState:
    attn: list  # (config, saved _attn_implementation_internal or _MISSING)
    instance_hook: bool
    modules: list  # attention modules given a _kvmem_ops attribute


def is_patched(model) -> bool:
    """Whether ``kvmem.patch`` was applied to ``model`` (and not undone)."""
    return getattr(model, "_kvmem_state", None) is not None


def _all_configs(model):
    """Every config object the attention implementation may be stored on (deduplicated)."""
    from transformers import PreTrainedModel

    seen, out = set(), []

    def add(cfg):
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            add(getattr(cfg, key, None))

    add(getattr(model, "config", None))
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            add(m.config)
    return out


def _check_args(backend, block_size, num_blocks, memory, prefix_cache):
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
    return backend, block_size


def patch(model, *, backend: str = "auto", block_size: int = 16, num_blocks: Union[None, int, Mapping] = None,
          memory: Union[None, int, str] = None, prefix_cache: bool = False, cuda_graph: bool = False,
          compile_decode: Union[None, bool, dict] = None):
    """Run ``model``'s attention on kvmem's paged kernels and make ``generate()`` use a ``PagedKVCache``.

    Parameters
    ----------
    model: a Hugging Face causal LM (``PreTrainedModel`` with ``generate``) of a supported family
        (``kvmem.integrations.families``)
    backend: ``"auto"`` (fastest capable) or ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``
    block_size: tokens per KV page
    num_blocks: pages per layer group (int, or mapping ``"full"`` / ``"sliding_<W>"`` -> int);
        default: sized per ``generate()`` call for its batch and ``max_length``
    memory: total bytes for the KV pools (int or e.g. ``"2GiB"``), split over the layer groups
    prefix_cache: keep the KV pools across ``generate()`` calls and start each call from the cached
        blocks of its prompts' longest cached prefix (full blocks of earlier prompts; rows of a
        batch start from the same column, left padding allowed): only the rest of the prompt is
        computed. The cache a call returns is released by the next call.
    cuda_graph: run ``generate()``'s decode steps (one token per row) with static, fixed-shape
        metadata, captured in a CUDA graph once per batch size (per ``generate()`` call) and
        replayed; prefill stays eager. On a device without CUDA graphs the same static step runs
        eagerly. The KV pools are kept across calls (as with ``prefix_cache``, the cache a call
        returns is released by the next call), so later calls of the same batch size and length
        replay the graphs captured by the first. See ``kvmem.integrations.DecodeGraphRunner``.
    compile_decode: True or a dict of ``torch.compile`` options (``fullgraph=True`` by default):
        compile the static decode step (with ``cuda_graph`` on CUDA, the compiled step is captured)

    Returns
    -------
    the same ``model`` (patched in place). Patching a patched model is a no-op.

    Raises
    ------
    kvmem.integrations.families.UnsupportedModelError
        naming the unsupported model type / feature and the supported families.
    """
    if is_patched(model):
        return model
    backend, block_size = _check_args(backend, block_size, num_blocks, memory, prefix_cache)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"kvmem.patch: cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if compile_decode is not None and not isinstance(compile_decode, (bool, dict)):
        raise TypeError(f"kvmem.patch: compile_decode must be None, a bool or a dict of torch.compile options, "
                        f"got {type(compile_decode).__name__}")
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise families.UnsupportedModelError(
            f"kvmem.patch: expected a transformers PreTrainedModel, got {type(model).__name__}. "
            f"{families.supported_list()}.")
    families.resolve(model.config, model)
    register()
    saved = [(cfg, cfg.__dict__.get("_attn_implementation_internal", _MISSING)) for cfg in _all_configs(model)]
    try:
        model.set_attn_implementation(ATTN_NAME)
        if not uses_kvmem(model):
            raise families.UnsupportedModelError(
                f"kvmem.patch: {type(model).__name__} did not accept attn_implementation='kvmem'. "
                f"{families.supported_list()}.")
    except BaseException:
        _restore_attn(saved)
        raise
    ops = KernelOps(backend)
    modules = []
    if backend != "auto":
        for m in model.modules():
            if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention"):
                m._kvmem_ops = ops
                modules.append(m)
    model._kvmem_options = KvmemOptions(backend=backend, block_size=block_size, num_blocks=num_blocks,
                                        memory=memory, prefix_cache=prefix_cache, cuda_graph=cuda_graph,
                                        compile_decode=compile_decode)
    if cuda_graph or compile_decode:
        from kvmem.integrations import hf_graphs

        hf_graphs.install(model, cuda_graph=cuda_graph, compile=compile_decode or None)
    if prefix_cache or cuda_graph:
        model.generate = types.MethodType(_capturing_generate, model)
    model._kvmem_state = _PatchState(attn=saved, instance_hook=instance_generate_hook(model), modules=modules)
    return model


def _capturing_generate(self, *args, **kwargs):
    """``generate`` of a prefix-caching / CUDA-graph patched model: remembers the prompt for the cache hook."""
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if ids is None:
        ids = kwargs.get("input_ids")
    prev = getattr(_prompt_tls, "prompt", None)
    _prompt_tls.prompt = (ids, kwargs.get("attention_mask"))
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        _prompt_tls.prompt = prev


def _restore_attn(saved) -> None:
    for cfg, value in saved:
        if value is _MISSING:
            cfg.__dict__.pop("_attn_implementation_internal", None)
        else:
            cfg.__dict__["_attn_implementation_internal"] = value


def unpatch(model):
    """Undo ``kvmem.patch``: the original attention implementation and ``generate()`` cache.

    A model that is not patched is returned unchanged (no-op).
    """
    state = getattr(model, "_kvmem_state", None)
    if state is None:
        return model
    _restore_attn(state.attn)
    if state.instance_hook:
        model.__dict__.pop("_prepare_cache_for_generation", None)
    for m in state.modules:
        m.__dict__.pop("_kvmem_ops", None)
    from kvmem.integrations import hf_graphs

    hf_graphs.uninstall(model)
    opts = model.__dict__.pop("_kvmem_options", None)
    if opts is not None and opts.pool is not None and opts.pool.live is not None:
        opts.pool.live.release()
    if opts is not None and (opts.prefix_cache or opts.cuda_graph):
        model.__dict__.pop("generate", None)
    model.__dict__.pop("_kvmem_state", None)
    return model
