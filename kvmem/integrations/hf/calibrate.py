"""``kvmem.calibrate_kv_scales``: static float8 KV scales from one calibration forward.

>>> scales = kvmem.calibrate_kv_scales(model, calib_ids)            # per (layer, KV head), K and V
>>> kvmem.patch(model, kv_cache_dtype="fp8_e4m3", kv_scales=scales)

The forward runs the model as it is (patched or not: the keys are the same) with a recording
``DynamicCache``: every layer's ``cache.update(k, v)`` hands it the keys as kvmem caches them
(after RoPE) and the values; per KV head the absmax over the real tokens (padding excluded) and
the head dim gives ``scale = absmax * headroom / finfo(dtype).max`` (``kvmem.cache.scales``).

The memory bank's extend mode caches its layers' keys *before* RoPE: ``keys="pre"`` un-rotates
them with the ``(cos, sin)`` each attention module received (recorded by a forward pre-hook),
``keys="both"`` takes the larger of the two absmaxes (safe for a model whose bank layers cache
pre-RoPE and whose dense layers post-RoPE keys: use it with ``MemoryConfig(mode="extend")``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from kvmem.cache.scales import DEFAULT_HEADROOM, KVScales, scales_from_absmax
from kvmem.integrations import families
from kvmem.integrations.hf.compat import cache_kwarg
from kvmem.integrations.hf.tp import rank_kv_heads
from kvmem.ops._common import is_fp8

__all__ = ["calibrate_kv_scales"]


def _recording_cache_class():
    from transformers import DynamicCache

    class _AbsmaxCache(DynamicCache):
        """A ``DynamicCache`` that records per-head absmax of what each layer writes."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self._kvmem_record(key_states, value_states, layer_idx)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return _AbsmaxCache


class _Recorder:
    def __init__(self, model, keys: str, mask: Optional[torch.Tensor]):
        self.model, self.keys, self.mask = model, keys, mask
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self.pe: Dict[int, tuple] = {}
        self._half: Dict[int, bool] = {}

    def pre_hook(self, module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            self.pe[module.layer_idx] = pe

    def _absmax(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] -> [H] absmax over the real tokens."""
        a = x.detach().float().abs()
        if self.mask is not None:
            m = self.mask[:, -x.shape[2]:].to(device=x.device, dtype=torch.bool)
            a = a.masked_fill(~m[:, None, :, None], 0.0)
        return a.amax(dim=(0, 2, 3)).cpu()

    def _pre_rope(self, layer_idx: int, key: torch.Tensor) -> torch.Tensor:
        from kvmem.integrations.hf import rope

        pe = self.pe.get(layer_idx)
        if pe is None:
            raise ValueError(f"kvmem.calibrate_kv_scales: keys='{self.keys}' needs the (cos, sin) position "
                             f"embeddings layer {layer_idx}'s attention module receives; it received none")
        if layer_idx not in self._half:
            self._half[layer_idx] = rope.rope_half_table(self.model, layer_idx=layer_idx)
        cos, sin = pe
        return rope.unrotate(key, cos, sin, half_table=self._half[layer_idx])

    def record(self, key, value, layer_idx: int) -> None:
        with torch.no_grad():
            if self.keys == "post":
                ka = self._absmax(key)
            elif self.keys == "pre":
                ka = self._absmax(self._pre_rope(layer_idx, key))
            else:
                ka = torch.maximum(self._absmax(key), self._absmax(self._pre_rope(layer_idx, key)))
            va = self._absmax(value)
        self.k[layer_idx] = ka if layer_idx not in self.k else torch.maximum(self.k[layer_idx], ka)
        self.v[layer_idx] = va if layer_idx not in self.v else torch.maximum(self.v[layer_idx], va)


def calibrate_kv_scales(model, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                        headroom: float = DEFAULT_HEADROOM, dtype: torch.dtype = torch.float8_e4m3fn,
                        keys: str = "post") -> KVScales:
    """Static per-(layer, KV head) float8 scales of ``model``'s keys and values on ``input_ids``.

    Parameters
    ----------
    model: a Hugging Face causal LM (patched or not)
    input_ids: [batch, tokens] (or [tokens]) calibration prompts, e.g. a few hundred tokens of
        representative text
    attention_mask: [batch, tokens] (1 = real token); padding is excluded from the absmax
    headroom: multiple of the observed absmax that maps to ``finfo(dtype).max`` (> 0; larger:
        fewer clamped outliers later, coarser small values)
    dtype: the float8 format (``torch.float8_e4m3fn`` or ``torch.float8_e5m2``)
    keys: ``"post"`` (keys after RoPE, kvmem's layout), ``"pre"`` (before RoPE) or ``"both"``
        (the larger; for a memory bank in extend mode)

    Returns
    -------
    ``KVScales``: per layer ``[num_kv_heads]`` fp32 ``k`` and ``v`` scales, for
    ``kvmem.patch(model, kv_cache_dtype=dtype, kv_scales=...)``; on a model sharded with tensor
    parallelism, those of this rank's KV heads (no communication)
    """
    where = "kvmem.calibrate_kv_scales"
    if not is_fp8(dtype):
        raise ValueError(f"{where}: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if keys not in ("post", "pre", "both"):
        raise ValueError(f"{where}: keys must be 'post', 'pre' or 'both', got {keys!r}")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not headroom > 0 \
            or headroom == float("inf"):
        raise ValueError(f"{where}: headroom must be a finite float > 0, got {headroom!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        raise ValueError(f"{where}: input_ids must be a non-empty [batch, tokens] or [tokens] tensor")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    num_layers, _, _ = families.kv_dims(model.config)
    kv_heads = rank_kv_heads(model)  # under tensor parallelism: this rank's heads' scales
    rec = _Recorder(model, keys, attention_mask)
    cache = _recording_cache_class()(config=model.config)
    cache._kvmem_record = rec.record
    hooks = [m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True) for m in model.modules()
             if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(device), use_cache=True,
                  attention_mask=None if attention_mask is None else attention_mask.to(device),
                  **{cache_kwarg(model): cache})
    finally:
        for h in hooks:
            h.remove()
    missing = [i for i in range(num_layers) if i not in rec.k]
    if missing:
        raise RuntimeError(f"{where}: layers {missing} wrote no keys during the calibration forward")
    ks = [scales_from_absmax(rec.k[i], headroom, dtype) for i in range(num_layers)]
    vs = [scales_from_absmax(rec.v[i], headroom, dtype) for i in range(num_layers)]
    for s in ks:
        if s.shape[0] != kv_heads:
            raise RuntimeError(f"{where}: recorded {s.shape[0]} KV heads, the model holds {kv_heads}")
    return KVScales(ks, vs, headroom=float(headroom), dtype=dtype)
