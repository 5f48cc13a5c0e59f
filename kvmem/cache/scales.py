"""The KV cache dtype and the quantisation scales of a float8 cache.

* ``kv_cache_dtype(value)``: the one parser of ``kv_cache_dtype=`` (``kvmem.patch``, ``PagedKVCache``):
  None / ``"auto"`` (the model's dtype), a torch dtype or a name (``KV_DTYPE_NAMES``).
* ``KVScales``: static per-(layer, KV head) scales, ``[Hkv]`` fp32 for K and for V of every layer
  (``kvmem.calibrate_kv_scales`` makes them; ``as_kv_scales`` turns a float or per-layer tensors
  into one).
* ``PoolScales``: the scales a pool's pages are written and read with, **fixed for the life of the
  pool** (a page written by one call is read by later ones: prefix reuse). Either given, or fixed
  per layer by that layer's first write (the default rule, ``AUTO`` below).

The default rule (fp8 without ``kv_scales``)
---------------------------------------------
Each layer's first ``cache_write`` into a pool (the first prefill: the prompt) fixes that layer's
scales from the keys/values it writes, as cached (post-RoPE; a memory bank in extend mode caches
its layers' keys pre-RoPE, and the rule sees those):
``scale[h] = max(absmax over that write's tokens and dims of head h, MIN_ABSMAX) * headroom /
finfo(fp8).max`` with ``headroom = DEFAULT_HEADROOM``. Later writes never change them; a value
beyond ``scale * finfo.max`` is clamped to the largest finite code (``kvmem.ops._common.encode``).
The measured error is in ``benchmarks/results/kv_quality`` (README "KV cache dtype").

Key centring (``center_keys``)
------------------------------
With ``center_keys`` a layer's first write also fixes ``mu[h, d]``, the mean of its keys over that
write's tokens (padding excluded: the caller passes real tokens only), and the pages store
``k - mu``; its key scale is then fixed from the absmax of ``k - mu``. Softmax is invariant to a
per-query constant added to all of a query's scores, and ``q . (k - mu) = q . k - q . mu`` is one,
so the attention output is unchanged in exact arithmetic while the channels with a large mean
(common in keys) quantise with a much smaller absolute error. Only exact where nothing reads the
absolute score (no softcap, no sink logits) and the shift is one constant per query: not in the
memory bank's layers (extend mode rotates cached keys as they are read, so ``rotate(mu)`` depends
on the key's position; exact mode's page selection takes a max over a GQA group's query heads,
each shifted by its own ``q . mu``: ``kvmem.integrations.hf.memory.CacheBank.run``). The caller
decides per layer (``for_write(..., center=)``). The lse of a centred layer would be shifted by
``scale * q . mu``; no kvmem HF path reads an lse outside ``paged_attention`` (``run_layer`` takes its
output only). ``mu`` is fixed for the life of the pool, like the scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Dict, List, Optional, Tuple, Union

import torch

from kvmem.ops._common import FP8_DTYPES, is_fp8

__all__ = ["KV_DTYPE_NAMES", "DEFAULT_HEADROOM", "DEFAULT_CENTER_KEYS", "MIN_ABSMAX", "kv_cache_dtype", "KVScales",
           "as_kv_scales",
           "scales_from_absmax", "center_keys_arg", "PoolScales", "scales_key"]

#: accepted ``kv_cache_dtype`` names
KV_DTYPE_NAMES: Dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2,
}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16) + FP8_DTYPES

#: multiple of the calibrated absmax that maps to the format's largest finite value
DEFAULT_HEADROOM = 2.0
#: whether float8 caches centre their keys by default (``kv_center_keys``; "Key centring" above)
DEFAULT_CENTER_KEYS = True
#: floor of a head's absmax (an all-zero head still gets a positive scale)
MIN_ABSMAX = 1e-6


def _accepted() -> str:
    names = ", ".join(repr(n) for n in KV_DTYPE_NAMES)
    return f"None, 'auto', a torch dtype ({', '.join(str(d) for d in _DTYPES)}) or one of {names}"


def kv_cache_dtype(value, where: str = "kvmem.patch") -> Optional[torch.dtype]:
    """``kv_cache_dtype=`` normalised: a torch dtype, or None for the model's dtype (None / ``"auto"``).

    Raises
    ------
    ValueError / TypeError
        naming the accepted values
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value not in _DTYPES:
            raise ValueError(f"{where}: kv_cache_dtype must be {_accepted()}; got {value}")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key == "auto":
            return None
        if key in KV_DTYPE_NAMES:
            return KV_DTYPE_NAMES[key]
        raise ValueError(f"{where}: kv_cache_dtype must be {_accepted()}; got {value!r}")
    raise TypeError(f"{where}: kv_cache_dtype must be {_accepted()}; got {type(value).__name__}")


def center_keys_arg(value, where: str) -> bool:
    """``kv_center_keys=`` checked: a bool (TypeError otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: kv_center_keys must be a bool, got {type(value).__name__}")
    return value


def scales_from_absmax(absmax: torch.Tensor, headroom: float, dtype: torch.dtype) -> torch.Tensor:
    """``max(absmax, MIN_ABSMAX) * headroom / finfo(dtype).max`` in fp32 (the calibration rule)."""
    return absmax.float().clamp_min(MIN_ABSMAX) * float(headroom) / torch.finfo(dtype).max


class KVScales:
    """Static per-(layer, KV head) quantisation scales of a float8 KV cache.

    ``cache_write`` stores ``encode(k / k_scale)``; attention reads ``code * k_scale``.

    Parameters
    ----------
    k, v: per layer, ``[num_kv_heads]`` (or 0-d) fp32 tensors, positive and finite
    headroom: the headroom they were calibrated with (None: given by hand)
    dtype: the fp8 format they were calibrated for (None: any)

    Attributes
    ----------
    k, v: tuples of CPU fp32 tensors, one per layer
    """

    def __init__(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], *, headroom: Optional[float] = None,
                 dtype: Optional[torch.dtype] = None):
        if len(k) != len(v):
            raise ValueError(f"KVScales: {len(k)} key scales but {len(v)} value scales (one pair per layer)")
        self.k = tuple(_scale_tensor(s, f"k[{i}]") for i, s in enumerate(k))
        self.v = tuple(_scale_tensor(s, f"v[{i}]") for i, s in enumerate(v))
        self.headroom, self.dtype = headroom, dtype

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def layer(self, layer_idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_idx], self.v[layer_idx]

    def as_dict(self) -> Dict[str, List[List[float]]]:
        """``{"k": [[per head] per layer], "v": ...}`` (JSON-able)."""
        return {"k": [s.reshape(-1).tolist() for s in self.k], "v": [s.reshape(-1).tolist() for s in self.v]}

    def __repr__(self) -> str:
        lo = min(float(s.min()) for s in self.k + self.v) if self.k else float("nan")
        hi = max(float(s.max()) for s in self.k + self.v) if self.k else float("nan")
        return f"KVScales({self.num_layers} layers, scales in [{lo:.3g}, {hi:.3g}], headroom={self.headroom})"


def _scale_tensor(s, what: str) -> torch.Tensor:
    if isinstance(s, bool) or not isinstance(s, (int, float, torch.Tensor)):
        raise TypeError(f"kvmem: kv_scales {what} must be a float or an fp32 tensor (0-d or [num_kv_heads]), "
                        f"got {type(s).__name__}")
    t = torch.as_tensor(s).detach().to("cpu", torch.float32)
    if t.dim() > 1:
        raise ValueError(f"kvmem: kv_scales {what} must be 0-d or [num_kv_heads], got shape {tuple(t.shape)}")
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"kvmem: kv_scales {what} must be finite and > 0, got {t.tolist()}")
    return t.clone()


def as_kv_scales(value, num_layers: int, num_kv_heads, where: str = "kvmem.patch") -> Optional[KVScales]:
    """``kv_scales=`` normalised to a ``KVScales`` (None / ``"auto"``: the default rule, returns None).
    ``num_kv_heads``: the heads a per-head scale may have (an int, or a tuple of the counts allowed).

    Accepted: a positive float (one scale for every layer and head, K and V), a ``KVScales``
    (``kvmem.calibrate_kv_scales``), a sequence of one ``(k_scale, v_scale)`` pair per layer, or a
    mapping ``{"k": [per layer], "v": [per layer]}``; each scale a float or a 0-d / ``[num_kv_heads]``
    tensor.
    """
    accepted = ("None, 'auto', a float > 0, a kvmem.KVScales (kvmem.calibrate_kv_scales), a sequence of "
                "(k_scale, v_scale) per layer or a mapping {'k': [...], 'v': [...]}")
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        if isinstance(value, KVScales):
            scales = value
        elif isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) and (
                not isinstance(value, torch.Tensor) or value.dim() == 0):
            one = _scale_tensor(value, "")
            scales = KVScales([one] * num_layers, [one] * num_layers)
        elif isinstance(value, Mapping) and set(value) == {"k", "v"}:
            scales = KVScales(list(value["k"]), list(value["v"]))
        elif isinstance(value, Sequence) and not isinstance(value, str) and all(
                isinstance(p, Sequence) and len(p) == 2 for p in value):
            scales = KVScales([p[0] for p in value], [p[1] for p in value])
        else:
            raise TypeError(f"{where}: kv_scales must be {accepted}; got {type(value).__name__}")
    except (TypeError, ValueError) as e:
        if str(e).startswith(where):
            raise
        raise type(e)(f"{where}: kv_scales must be {accepted}: {e}") from None
    if scales.num_layers != num_layers:
        raise ValueError(f"{where}: kv_scales has {scales.num_layers} layers, the model {num_layers}")
    for i, (k, v) in enumerate(zip(scales.k, scales.v)):
        for name, s in (("k", k), ("v", v)):
            allowed = (num_kv_heads,) if isinstance(num_kv_heads, int) else tuple(num_kv_heads)
            if s.dim() == 1 and s.shape[0] not in allowed:
                raise ValueError(f"{where}: kv_scales {name}[{i}] has {s.shape[0]} entries, the model "
                                 f"{' or '.join(map(str, allowed))} KV heads")
    return scales


def scales_key(dtype: Optional[torch.dtype], scales: Optional[KVScales], headroom: float = DEFAULT_HEADROOM,
               center_keys: bool = False):
    """What ``kvmem.model_fingerprint(kv_scales=)`` is given for a cache of ``dtype``: None (not
    quantised), the given scales' tensors, or the default rule and its headroom; with
    ``center_keys`` the key-centring rule too (its ``mu`` is fixed by each layer's first write)."""
    if dtype is None or not is_fp8(dtype):
        return None
    key = {"rule": "first_write", "headroom": float(headroom)} if scales is None else {
        "k": list(scales.k), "v": list(scales.v)}
    if center_keys:
        key["center_keys"] = "first_write_mean"
    return key


class PoolScales:
    """The scales of one pool's pages (see the module docstring): given, or fixed per layer by its
    first write; never changed afterwards.

    Parameters
    ----------
    dtype: the pool's float8 dtype
    num_layers: layers of the pool
    given: ``KVScales`` to use, or None for the default rule
    headroom: of the default rule
    center_keys: store ``k - mu`` (see "Key centring" in the module docstring) in the layers whose
        first write asks for it
    """

    def __init__(self, dtype: torch.dtype, num_layers: int, given: Optional[KVScales] = None,
                 headroom: float = DEFAULT_HEADROOM, center_keys: bool = False):
        if not is_fp8(dtype):
            raise ValueError(f"kvmem: PoolScales are for float8 caches, got {dtype}")
        if not (isinstance(headroom, (int, float)) and not isinstance(headroom, bool)
                and math.isfinite(headroom) and headroom > 0):
            raise ValueError(f"kvmem: headroom must be a finite float > 0, got {headroom!r}")
        self.dtype, self.num_layers, self.headroom = dtype, num_layers, float(headroom)
        self.given, self.center_keys = given, center_keys_arg(center_keys, "kvmem")
        self._centers: Dict[int, Optional[torch.Tensor]] = {}  # layer -> [Hkv, D] fp32 mu, or None
        self._centers_on: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._fixed: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> CPU or device fp32 pair
        self._on: Dict[Tuple[int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
        if given is not None:
            for i in range(num_layers):
                self._fixed[i] = given.layer(i)

    def is_fixed(self, layer_idx: int) -> bool:
        return layer_idx in self._fixed

    def for_write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  center: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """The layer's ``(k_scale, v_scale)`` on ``k``'s device; the first call of an unfixed layer
        fixes them from ``k``/``v`` ``[T, Hkv, D]`` (device work, no host sync), and with
        ``center_keys`` and ``center`` (the layer may be centred) its key mean ``mu``
        (``center_of``); the key scale is then that of ``k - mu``."""
        if layer_idx not in self._centers:
            mu = None
            if self.center_keys and center and k.shape[0] > 0:
                with torch.no_grad():
                    mu = k.detach().float().mean(dim=0).contiguous()
            self._centers[layer_idx] = mu
        if layer_idx not in self._fixed:
            mu = self._centers[layer_idx]
            with torch.no_grad():
                kc = k.detach().float() if mu is None else k.detach().float() - mu.to(k.device)
                ks = scales_from_absmax(kc.abs().amax(dim=(0, 2)), self.headroom, self.dtype)
                vs = scales_from_absmax(v.detach().abs().amax(dim=(0, 2)), self.headroom, self.dtype)
            self._fixed[layer_idx] = (ks.contiguous(), vs.contiguous())
        return self.on(layer_idx, k.device)

    def center_of(self, layer_idx: int, device: torch.device) -> Optional[torch.Tensor]:
        """The layer's key mean ``mu`` ``[Hkv, D]`` fp32 on ``device`` (the same tensor every call),
        None when the layer's keys are stored as they are (or its first write has not happened)."""
        mu = self._centers.get(layer_idx)
        if mu is None:
            return None
        key = (layer_idx, torch.device(device))
        on = self._centers_on.get(key)
        if on is None:
            on = self._centers_on[key] = mu.to(key[1]).contiguous()
        return on

    def centred(self, layer_idx: int, k: torch.Tensor) -> torch.Tensor:
        """``k`` ``[T, Hkv, D]`` as the layer's pages store it: ``k - mu`` (in ``k``'s dtype) in a layer with
        centred keys, else ``k`` itself. Call after the layer's first ``for_write``."""
        mu = self.center_of(layer_idx, k.device)
        return k if mu is None else (k.float() - mu).to(k.dtype)

    def centers(self) -> Dict[int, Optional[torch.Tensor]]:
        """layer -> its fixed ``mu`` (CPU copy) or None, for the layers written so far."""
        return {i: None if m is None else m.cpu() for i, m in self._centers.items()}

    def on(self, layer_idx: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``(k_scale, v_scale)`` of a layer on ``device`` (the same tensors every call)."""
        key = (layer_idx, torch.device(device))
        pair = self._on.get(key)
        if pair is None:
            fixed = self._fixed.get(layer_idx)
            if fixed is None:
                raise RuntimeError(f"kvmem: layer {layer_idx}'s fp8 scales are not fixed yet (its first write fixes "
                                   f"them)")
            pair = tuple(s.to(key[1], torch.float32).contiguous() for s in fixed)
            self._on[key] = pair
        return pair

    def snapshot(self) -> Optional[KVScales]:
        """The scales as a ``KVScales`` (CPU copies; one host sync), None until every layer is fixed."""
        if len(self._fixed) < self.num_layers:
            return None
        pairs = [self._fixed[i] for i in range(self.num_layers)]
        return KVScales([k for k, _ in pairs], [v for _, v in pairs],
                        headroom=None if self.given is not None else self.headroom, dtype=self.dtype)
