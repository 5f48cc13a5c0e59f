"""``kvmem.patch`` / ``kvmem.unpatch``: run a Hugging Face causal LM on kvmem's paged KV cache.

>>> model = kvmem.patch(model)                      # attention -> "kvmem", generate() -> PagedKVCache
>>> out = model.generate(**inputs, max_new_tokens=64)
>>> kvmem.unpatch(model)                            # exactly the original behaviour again
>>> kvmem.patch(model, cuda_graph=True)            # decode steps replayed from CUDA graphs (on CUDA)
>>> kvmem.patch(model, memory_bank=kvmem.MemoryConfig(mode="extend"))  # sinks + top-k bank + window

Equivalently, after ``kvmem.integrations.hf.register()`` (``kvmem.patch`` calls it),
``from_pretrained(..., attn_implementation="kvmem")`` or ``model.set_attn_implementation("kvmem")``
give the same ``generate()`` behaviour with default options (without the position-embedding
record of ``kvmem.patch``'s pre-hooks, which nothing consumes yet).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from kvmem.integrations import families
from kvmem.integrations.hf import compat, graphs
from kvmem.integrations.hf.attention import ATTN_NAME, kvmem_attention_forward, kvmem_mask, uses_kvmem
from kvmem.integrations.hf.cache import PagedKVCache
from kvmem.integrations.hf.cascade import option as cascade_option
from kvmem.integrations.hf.generate import capturing_generate, install_generate_hook, instance_generate_hook
from kvmem.cache.scales import DEFAULT_CENTER_KEYS, DEFAULT_HEADROOM, center_keys_arg
from kvmem.integrations.hf.options import KvmemOptions, check_args, check_kv_args
from kvmem.integrations.hf.tp import rank_kv_heads
from kvmem.ops.kernel_ops import KernelOps

__all__ = ["patch", "unpatch", "is_patched", "register", "is_registered"]

_MISSING = object()
_registered = False


def _record_position_embeddings(module, args, kwargs):
    """Pre-hook of a patched attention module: a ``PagedKVCache`` records the ``(cos, sin)`` the
    module is about to apply (``LayerContext.position_embeddings``)."""
    pe = kwargs.get("position_embeddings")
    if pe is None:
        return None
    cache = compat.kwargs_cache(kwargs)
    if isinstance(cache, PagedKVCache):
        cache.record_position_embeddings(module.layer_idx, pe)
    return None


@dataclass
class _PatchState:
    attn: list  # (config, saved _attn_implementation_internal or _MISSING)
    instance_hook: bool
    modules: list  # attention modules given a _kvmem_ops attribute
    hooks: list = field(default_factory=list)  # handles of the position-embedding pre-hooks
    args: dict = field(default_factory=dict)  # the keyword arguments of the patch() call


def _same(a, b) -> bool:
    """Whether two ``patch()`` arguments are the same (tensors by value, banks by identity)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_repatch(model, args: dict) -> None:
    """Patching a patched model again is a no-op with the same arguments; with other ones it would
    silently keep the old, so it raises."""
    old = model._kvmem_state.args
    differ = [k for k in args if k in old and not _same(args[k], old[k])]
    if differ:
        raise ValueError(f"kvmem.patch: the model is already patched with other {', '.join(differ)}; "
                         f"call kvmem.unpatch(model) first (attached banks swap without re-patching: "
                         f"kvmem.set_banks(model, banks))")


def is_patched(model) -> bool:
    """Whether ``kvmem.patch`` was applied to ``model`` (and not undone)."""
    return getattr(model, "_kvmem_state", None) is not None


def _all_configs(model):
    """Every config object the attention implementation may be stored on (deduplicated)."""
    PreTrainedModel = compat.pretrained_model_class()
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


def patch(model, *, backend: str = "auto", block_size: Optional[int] = None,
          num_blocks: Union[None, int, Mapping] = None, memory: Union[None, int, str] = None,
          prefix_cache: bool = False, cuda_graph: bool = False, compile_decode: Union[None, bool, dict] = None,
          memory_bank=None, kv_cache_dtype=None, kv_scales=None, kv_scale_headroom: float = DEFAULT_HEADROOM,
          kv_center_keys: bool = DEFAULT_CENTER_KEYS, banks=None, cascade: Union[None, bool, str] = None):
    """Run ``model``'s attention on kvmem's paged kernels and make ``generate()`` use a ``PagedKVCache``.

    Parameters
    ----------
    model: a Hugging Face causal LM (``PreTrainedModel`` with ``generate``) of a supported family
        (``kvmem.integrations.families``)
    backend: ``"auto"`` (fastest capable) or ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``
    block_size: tokens per KV page (default 16, or the memory bank's ``block_size``)
    num_blocks: pages per layer group (int, or mapping ``"full"`` / ``"sliding_<W>"`` -> int);
        default: sized per ``generate()`` call for its batch and ``max_length``
    memory: total bytes for the KV pools (int or e.g. ``"2GiB"``), split over the layer groups; under
        tensor parallelism (``from_pretrained(..., tp_plan="auto")``) each rank's pools hold only its
        KV heads and ``memory`` is each rank's budget (``kvmem.integrations.hf.tp``)
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
    memory_bank: a ``kvmem.MemoryConfig``: the full-attention layers (after its ``dense_layers``)
        attend to attention sinks + the top-k most relevant evicted blocks + a local window
        (``kvmem.integrations.hf.memory``; README "Memory bank"); resolved against the model here
        (errors leave the model unpatched). The pages are its blocks. Not with ``cuda_graph``,
        ``compile_decode`` or ``prefix_cache`` (yet). ``model._kvmem_memory_report`` then holds the
        selections of the latest prefill (``MemoryReport``). ``memory=`` keeps meaning the KV bytes.
    kv_cache_dtype: the KV pools' dtype: None / ``"auto"`` (the model's), a torch dtype
        (``torch.float32``, ``bfloat16``, ``float16``, ``float8_e4m3fn``, ``float8_e5m2``) or a name
        (``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``,
        ``"fp8"``/``"fp8_e4m3"``, ``"fp8_e5m2"``). It may differ from the model's dtype (e.g. bf16 KV
        under an fp32 model): keys/values are converted as written and read. ``memory=``,
        auto-sizing, ``usage()`` and ``CacheFullError`` count bytes of this dtype (1 per element for fp8).
    kv_scales: float8 caches only: static per-(layer, KV head) scales: a ``kvmem.KVScales`` from
        ``kvmem.calibrate_kv_scales`` (recommended), one float for every layer and head, per-layer
        ``(k_scale, v_scale)`` pairs (floats or 0-d / ``[num_kv_heads]`` tensors; under tensor
        parallelism the whole model's heads, each rank taking its own, or the rank's heads) or
        ``{"k": [...], "v": [...]}``. None / ``"auto"``: **each layer's first write into a pool
        (the first prompt) fixes its scales**, ``absmax * kv_scale_headroom / finfo(fp8).max`` per KV
        head of the keys/values as cached (``kvmem.cache.scales``); never changed for the life of
        the pool (``cache.kv_scales`` reads them). Part of the prefix cache's key.
    banks: a list of ``kvmem.MemoryBank`` (with ``memory_bank``): attached to every row's bank in
        every ``generate()`` call, in order, before the row's own evicted blocks, competing in the
        same top-k (``kvmem.integrations.hf.banks``; swap them later with ``kvmem.set_banks``). A bank
        of another model, dtype, RoPE, mode or layout raises a ``ValueError`` naming it, before the
        model changes.
    kv_scale_headroom: the headroom of that default rule (default ``DEFAULT_HEADROOM`` = 2)
    cascade: shared-prefix (cascade) decode when every row's block table starts with the same pages
        (``prefix_cache=True`` shares a batch's common prompt blocks): ``"auto"`` (when the rows
        share enough, ``kvmem.integrations.hf.cascade``), True (whenever they share a full page),
        False (never); None (default) follows the environment's ``KVMEM_CASCADE`` (default auto)
    kv_center_keys: float8 caches only: each layer's first write also fixes its keys' mean ``mu`` per
        (KV head, channel) and the pages store ``k - mu`` (softmax ignores the per-query shift
        ``q . mu``: the output is unchanged in exact arithmetic, the keys' quantisation error smaller;
        "Key centring" in ``kvmem.cache.scales``). Not in layers with a softcap or sink logits, nor in
        memory-bank layers. Default ``kvmem.cache.scales.DEFAULT_CENTER_KEYS``; part of the prefix
        cache's key; ignored for float caches.

    Returns
    -------
    the same ``model`` (patched in place). Patching a patched model again is a no-op with the
    same arguments and a ``ValueError`` with others (``kvmem.unpatch`` first).

    Raises
    ------
    kvmem.integrations.families.UnsupportedModelError
        naming the unsupported model type / feature and the supported families.
    """
    args = dict(backend=backend, block_size=block_size, num_blocks=num_blocks, memory=memory,
                prefix_cache=prefix_cache, cuda_graph=cuda_graph, compile_decode=compile_decode,
                memory_bank=memory_bank, kv_cache_dtype=kv_cache_dtype, kv_scales=kv_scales,
                kv_scale_headroom=kv_scale_headroom, kv_center_keys=kv_center_keys,
                banks=(list(banks) or None) if isinstance(banks, (list, tuple)) else banks, cascade=cascade)
    if is_patched(model):
        _check_repatch(model, args)
        return model
    page_size = block_size
    if memory_bank is not None:
        page_size = _bank_page_size(memory_bank, block_size, prefix_cache, cuda_graph, compile_decode)
    backend, block_size = check_args(backend, 16 if page_size is None else page_size, num_blocks, memory,
                                     prefix_cache, cuda_graph, compile_decode)
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise families.UnsupportedModelError(
            f"kvmem.patch: expected a transformers PreTrainedModel, got {type(model).__name__}. "
            f"{families.supported_list()}.")
    families.resolve(model.config, model)
    spread = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
    if memory_bank is not None and len(spread) > 1:
        raise ValueError(f"kvmem.patch: memory_bank needs the model on one device (a step's bank tables and "
                         f"attention mass are shared by every layer); its device_map spreads it over {spread}")
    num_layers, kv_heads, _ = families.kv_dims(model.config)
    here = rank_kv_heads(model)  # an already sharded model (tensor parallelism) must keep whole KV heads per rank
    kv_dtype, kv_scales = check_kv_args(kv_cache_dtype, kv_scales, kv_scale_headroom, num_layers,
                                        kv_heads if here == kv_heads else (kv_heads, here))
    center_keys_arg(kv_center_keys, "kvmem.patch")
    cascade_how = cascade_option(cascade)
    bank = None
    if memory_bank is not None:
        from kvmem.integrations.hf.memory import bank_spec

        bank = bank_spec(model, memory_bank, block_size)  # every error before the model changes
    if banks is not None:
        from kvmem.integrations.hf.banks import check_banks

        attached = check_banks(model, bank, banks, kv_dtype)
        if bank is not None:
            bank.attached = attached
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
    modules, hooks = [], []
    for m in model.modules():
        if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention"):
            hooks.append(m.register_forward_pre_hook(_record_position_embeddings, with_kwargs=True))
            if backend != "auto":
                m._kvmem_ops = ops
                modules.append(m)
    model._kvmem_options = KvmemOptions(backend=backend, block_size=block_size, num_blocks=num_blocks,
                                        memory=memory, prefix_cache=prefix_cache, cuda_graph=cuda_graph,
                                        compile_decode=compile_decode, memory_bank=bank, kv_cache_dtype=kv_dtype,
                                        kv_scales=kv_scales, kv_scale_headroom=float(kv_scale_headroom),
                                        kv_center_keys=kv_center_keys, cascade=cascade_how)
    if bank is not None:
        model._kvmem_memory_report = bank.report
    if cuda_graph or compile_decode:
        graphs.install(model, cuda_graph=cuda_graph, compile=compile_decode or None)
    if prefix_cache or cuda_graph:
        model.generate = types.MethodType(capturing_generate, model)
    model._kvmem_state = _PatchState(attn=saved, instance_hook=instance_generate_hook(model), modules=modules,
                                     hooks=hooks, args=args)
    return model


def _bank_page_size(memory_bank, block_size, prefix_cache, cuda_graph, compile_decode) -> Optional[int]:
    """The page size with a memory bank (its ``block_size``); rejects what does not combine with it."""
    from kvmem.memory import MemoryConfig

    if not isinstance(memory_bank, MemoryConfig):
        raise TypeError(f"kvmem.patch: memory_bank must be a kvmem.MemoryConfig, got {type(memory_bank).__name__}")
    for name, on in (("cuda_graph", cuda_graph), ("compile_decode", compile_decode), ("prefix_cache", prefix_cache)):
        if on:
            raise ValueError(f"kvmem.patch: memory_bank does not support {name}=... yet (static decode steps / "
                             f"shared pools of the bank); pass {name} only without memory_bank")
    if block_size is not None and memory_bank.block_size is not None and block_size != memory_bank.block_size:
        raise ValueError(f"kvmem.patch: block_size={block_size} and memory_bank's block_size="
                         f"{memory_bank.block_size} differ; the pages are the bank's blocks (pass one of them)")
    return memory_bank.block_size if memory_bank.block_size is not None else block_size


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
    for h in state.hooks:
        h.remove()
    graphs.uninstall(model)
    opts = model.__dict__.pop("_kvmem_options", None)
    if opts is not None and opts.pool is not None and opts.pool.live is not None:
        opts.pool.live.release()
    if opts is not None and (opts.prefix_cache or opts.cuda_graph):
        model.__dict__.pop("generate", None)
    model.__dict__.pop("_kvmem_state", None)
    model.__dict__.pop("_kvmem_memory_report", None)
    model.__dict__.pop("_kvmem_prefix_report", None)
    return model


def is_registered() -> bool:
    return _registered


def register() -> None:
    """Register ``"kvmem"`` with HF's attention and mask interfaces and hook ``generate`` (idempotent).

    After this, ``from_pretrained(..., attn_implementation="kvmem")`` and
    ``model.set_attn_implementation("kvmem")`` work, and ``generate()`` on such a model uses a
    ``PagedKVCache``.
    """
    global _registered
    if _registered:
        return
    compat.register_interfaces(ATTN_NAME, kvmem_attention_forward, kvmem_mask)
    install_generate_hook()
    _registered = True
