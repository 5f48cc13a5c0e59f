"""kvmem in ``generate()``: the cache each call gets, and the hook that makes it.

``install_generate_hook`` wraps ``GenerationMixin._prepare_cache_for_generation`` so that
``generate()`` on a model whose attention is ``"kvmem"`` creates a ``PagedKVCache`` (sized for the
call, ``make_cache``) where it would have created a ``DynamicCache``; every other model is
untouched. ``capturing_generate`` (the ``generate`` of a prefix-caching / CUDA-graph patched model)
records the call's prompt in the model's ``KvmemOptions.prompt`` for ``make_cache`` and, once the
call returns, registers its answers' blocks (``kvmem.integrations.hf.chain``).
"""

from __future__ import annotations

import functools
import types
from typing import Dict, List, Optional, Tuple

import torch

from kvmem.cache import KVPool, LayerGroupSpec
from kvmem.cache.scales import scales_key
from kvmem.cache.sizing import bytes_per_block, parse_memory, size_groups
from kvmem.integrations import families
from kvmem.integrations.hf.attention import uses_kvmem
from kvmem.integrations.hf.cache import PagedKVCache
from kvmem.integrations.hf.chain import PrefixReport, check_budget, prepass_shared_prefix, register_answers
from kvmem.integrations.hf.compat import cache_kwarg, generation_mixin, kwargs_cache
from kvmem.integrations.hf.fingerprint import model_fingerprint
from kvmem.integrations.hf.options import KvmemOptions, options_of
from kvmem.integrations.hf.tp import rank_kv_heads, rank_kv_scales

__all__ = ["make_cache", "make_generate_cache", "model_layer_devices", "install_generate_hook",
           "instance_generate_hook", "capturing_generate"]


def make_cache(options: KvmemOptions, model, *, max_batch_size: Optional[int] = None, max_cache_len: Optional[int] = None,
               expand: int = 1) -> PagedKVCache:
    """A ``PagedKVCache`` (``options``: the model's ``KvmemOptions``) for one ``generate()`` call of ``max_batch_size`` prompts (each expanded to
    ``expand`` rows: beams / return sequences) of up to ``max_cache_len`` tokens.

    With ``prefix_cache`` the cache lives in a ``KVPool`` kept across calls (the previous call's
    cache is released) and starts from the cached blocks of its prompts' longest known prefix; the
    pool is keyed by ``kvmem.model_fingerprint(model)`` (a model whose weights or config changed
    gets a new pool), and every row's block hash chain starts from the fingerprint (its namespace:
    no block is found across models or KV formats, even in a shared pool). A call that does not fit
    evicts least recently used cached blocks (the allocator does, as it allocates); an auto-sized
    pool grows instead when the call itself needs more blocks than it has, keeping its cached blocks
    (``KVPool.grow``); under a user budget a call that cannot fit at all raises ``CacheFullError``
    first, with nothing changed (``kvmem.integrations.hf.chain.check_budget``). Rows that all start
    with the same uncached full blocks have them computed once by a one-row pre-pass before the
    call (``kvmem.integrations.hf.chain.prepass_shared_prefix``).
    ``options.prefix_report`` (a ``PrefixReport``) records the reuse.
    With ``cuda_graph`` it lives in a kept ``KVPool`` too, so that the pools and the static
    decode buffers (``KVPool.static``) -- the memory captured CUDA graphs point at -- outlive
    the call and the next call of the same batch size and length replays the same graphs.
    The pools are in ``options.kv_cache_dtype`` (default the model's dtype); a float8 pool's scales
    are fixed for its life (``kvmem.cache.scales``) and, with ``prefix_cache``, part of its
    fingerprint (blocks are reused only under the same dtype and scales).
    Under tensor parallelism the cache holds this rank's KV heads (``kvmem.integrations.hf.tp``).
    """
    kv_heads = rank_kv_heads(model)  # this rank's KV heads under tensor parallelism (kvmem.integrations.hf.tp)
    kw = dict(block_size=options.block_size, backend=options.backend, num_kv_heads=kv_heads)
    kv_scales = rank_kv_scales(options.kv_scales, model, kv_heads)
    rows = (max_batch_size or 1) * expand
    if not (options.prefix_cache or options.cuda_graph):
        cache = PagedKVCache(model.config, num_blocks=options.num_blocks, memory=options.memory,
                            max_batch_size=rows, max_cache_len=max_cache_len, memory_bank=options.memory_bank,
                            kv_cache_dtype=options.kv_cache_dtype, kv_scales=kv_scales,
                            kv_scale_headroom=options.kv_scale_headroom, kv_center_keys=options.kv_center_keys,
                            **kw)
        cache._cascade = options.cascade
        return cache
    prompt = options.prompt
    rows_tokens, pads = _prompt_rows(prompt, max_batch_size, expand)
    dtype, device = options.kv_cache_dtype or model.dtype, model_layer_devices(model) or model.device
    _, _, head_dim = families.kv_dims(model.config)
    groups = [LayerGroupSpec(n, layers, w)
              for n, layers, w in families.group_layers(families.layer_windows(model.config))]
    per_block = bytes_per_block(groups, options.block_size, kv_heads, head_dim, dtype)
    if rows_tokens:
        step_len = max((len(t) + p for t, p in zip(rows_tokens, pads)), default=0)
    else:  # prompt unknown: size sliding groups for a prompt of the whole length
        step_len = max_cache_len or 0
    auto = options.num_blocks is None and options.memory is None
    want = size_groups(groups, options.block_size, per_block, rows=rows, step_len=step_len,
                       num_blocks=options.num_blocks,
                       memory=None if options.memory is None else parse_memory(options.memory),
                       max_cache_len=max_cache_len)
    fingerprint = (model_fingerprint(model, kv_dtype=dtype,
                                     kv_scales=scales_key(dtype, options.kv_scales, options.kv_scale_headroom,
                                                          options.kv_center_keys))
                   if options.prefix_cache else None)
    need = None
    if rows_tokens and not auto and options.prefix_cache:  # a call too large for the user's budget: before any change
        need = check_budget(groups, options.block_size, rows_tokens, pads, max_cache_len, want)
    pool = options.pool
    if pool is not None and pool.live is not None:
        pool.live.release()
    same_place = pool is not None and ((pool.layer_devices == device) if isinstance(device, dict) else
                                       (pool.layer_devices is None and pool.device == torch.device(device)))
    # auto-sized: room for this call (and with prefix_cache as much again of cached blocks)
    blocks = {k: 2 * v for k, v in want.items()} if auto and options.prefix_cache else want
    if (pool is None or pool.dtype != dtype or not same_place
            or pool.fingerprint != fingerprint):  # other weights / config: never reuse its blocks
        pool = options.pool = KVPool(groups, kv_heads, head_dim, options.block_size, blocks, dtype, device,
                                     fingerprint=fingerprint, kv_scales=kv_scales,
                                     kv_scale_headroom=options.kv_scale_headroom,
                                     kv_center_keys=options.kv_center_keys)
    elif auto and not pool.fits(want):  # grow, keeping every cached block (a user budget never grows)
        pool.grow({k: max(v, pool.num_blocks[k]) for k, v in blocks.items()})
    prepass = 0
    if options.prefix_cache and rows_tokens:  # rows sharing a prefix: compute it once (kvmem.integrations.hf.chain)
        prepass = prepass_shared_prefix(model, pool, rows_tokens, pads, namespace=fingerprint,
                                        block_size=options.block_size, cache_kw=kw,
                                        budget=None if need is None else want, need=need)
    cache = PagedKVCache(model.config, pool=pool, max_cache_len=max_cache_len, **kw)
    pool.live = cache
    cache._cascade = options.cascade
    cache._prompt_pads = pads if rows_tokens else None
    if options.prefix_cache:
        report = options.prefix_report = PrefixReport(rows=len(rows_tokens or ()),
                                                      prompt_tokens=sum(len(t) for t in rows_tokens or ()),
                                                      prepass_tokens=prepass)
        if rows_tokens:
            cols = cache.reuse_prefix(rows_tokens, pads, namespace=fingerprint)
            report.reused_per_row = [max(0, cols - p) for p in pads]
            report.reused_tokens = sum(report.reused_per_row)
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


_OK_CACHE_IMPLEMENTATIONS = (None, "dynamic", "hybrid", "sliding_window")


def make_generate_cache(model, generation_config, model_kwargs, batch_size, max_cache_length) -> None:
    """Put a ``PagedKVCache`` sized for this ``generate()`` call into ``model_kwargs``."""
    impl = getattr(generation_config, "cache_implementation", None)
    if impl not in _OK_CACHE_IMPLEMENTATIONS:
        raise ValueError(f"kvmem: generate(cache_implementation={impl!r}) is not supported with "
                         f"attn_implementation='kvmem', which brings its own paged cache; drop cache_implementation")
    expand = max(getattr(generation_config, "num_beams", None) or 1,
                 getattr(generation_config, "num_return_sequences", None) or 1)
    model_kwargs[cache_kwarg(model)] = make_cache(options_of(model), 
        model, max_batch_size=batch_size, max_cache_len=max_cache_length, expand=expand)


def _hooked(orig):
    @functools.wraps(orig)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (uses_kvmem(self) and kwargs_cache(model_kwargs) is None
                and getattr(generation_config, "use_cache", True) is not False
                and not getattr(self.config, "is_encoder_decoder", False)):
            names = ("generation_mode", "batch_size", "max_cache_length")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            make_generate_cache(self, generation_config, model_kwargs, bound.get("batch_size"),
                                bound.get("max_cache_length"))
            return None
        return orig(self, generation_config, model_kwargs, *args, **kwargs)

    _prepare_cache_for_generation._kvmem_orig = orig
    return _prepare_cache_for_generation


def install_generate_hook() -> None:
    """Wrap ``GenerationMixin._prepare_cache_for_generation`` once (inert unless attention is kvmem)."""
    GenerationMixin = generation_mixin()
    orig = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    if getattr(orig, "_kvmem_orig", None) is None:
        GenerationMixin._prepare_cache_for_generation = _hooked(orig)


def instance_generate_hook(model) -> bool:
    """For a model class that overrides ``_prepare_cache_for_generation``: wrap it on the instance.

    Returns whether an instance attribute was set.
    """
    cls_fn = type(model)._prepare_cache_for_generation
    if getattr(cls_fn, "_kvmem_orig", None) is not None:
        return False
    model._prepare_cache_for_generation = types.MethodType(_hooked(cls_fn), model)
    return True


def capturing_generate(self, *args, **kwargs):
    """``generate`` of a prefix-caching / CUDA-graph patched model: remembers the prompt for the cache hook."""
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if ids is None:
        ids = kwargs.get("input_ids")
    options = options_of(self)
    prev = options.prompt
    options.prompt = (ids, kwargs.get("attention_mask"))
    before = None if options.pool is None else options.pool.live
    options.prefix_report = None
    try:
        out = type(self).generate(self, *args, **kwargs)
    finally:
        options.prompt = prev
    report = options.prefix_report
    cache = None if options.pool is None else options.pool.live
    if options.prefix_cache and report is not None and cache is not None and cache is not before:
        # this call's cache: register its answers' blocks for the next call (kvmem.integrations.hf.chain)
        register_answers(cache, out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None), report)
        self._kvmem_prefix_report = report
    return out
