"""Pieces every op folder uses: the parameter-object helpers and the quantisation-scale shape."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Dict, FrozenSet, Optional, Tuple

import torch


NO_FEATURES: FrozenSet[str] = frozenset()


def features_of(feature_of: Dict[str, str], given: Dict[str, object]) -> FrozenSet[str]:
    """Feature names of the optional arguments in ``given`` that are not None."""
    names = [feature_of[name] for name, value in given.items() if value is not None]
    return frozenset(names) if names else NO_FEATURES


@functools.lru_cache(maxsize=None)
def _fields(cls) -> Tuple[Tuple[str, ...], Dict[str, object]]:
    fields = dataclasses.fields(cls)
    return tuple(f.name for f in fields), {f.name: f.default for f in fields}


@functools.lru_cache(maxsize=None)
def _kept(cls, omit: Tuple[str, ...]):
    names, _ = _fields(cls)
    return operator.itemgetter(*(i for i, n in enumerate(names) if n not in omit))


def flat(params, omit: Tuple[str, ...] = ()) -> tuple:
    """``params``' schema arguments (``params.to_schema()``), without the ``omit`` ones.

    Omitting an argument that is set raises: an implementation that does not take an optional
    argument can never be handed a call that uses it (the dispatcher rejects such a backend;
    this is the second lock)."""
    values = params.to_schema()
    if not omit:
        return values
    _, defaults = _fields(type(params))
    for name in omit:
        value, default = getattr(params, name), defaults[name]
        if (value is not None) if default is None else (value != default):
            raise RuntimeError(f"kvmem: {type(params).__name__}.{name} is set but this kernel does not take it")
    return _kept(type(params), omit)(values)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_fp8(dtype) -> bool:
    return dtype in FP8_DTYPES


def encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kvmem's one cache encoding of ``x`` (already divided by its scale) into ``dtype``: in fp32,
    clamped to +- the format's largest finite value, then rounded to nearest even (ties to even).

    Pinned so that every backend writes the same bits: a plain ``.to(float8_e4m3fn)`` saturates
    +-inf but gives NaN out of range on some paths, CUDA's ``satfinite`` clamps; here out-of-range
    values and +-inf become +-max, NaN stays NaN (sign kept), -0.0 stays -0.0. The kernels
    implement it with integer bit operations (``csrc/common/fp8.h``, ``kvmem/ops/triton_fp8.py``).
    """
    big = torch.finfo(dtype).max
    return x.float().clamp(-big, big).to(dtype)


def scale_of(scale: Optional[torch.Tensor], dtype=torch.float32) -> Optional[torch.Tensor]:
    """A 0-d or ``[Hkv]`` scale as a tensor broadcasting over ``[n, Hkv, D]``."""
    if scale is None:
        return None
    scale = scale.to(dtype)
    return scale.reshape(1, -1, 1) if scale.dim() == 1 else scale  # [1, Hkv, 1] or []


def omitted_args(feature_of: Dict[str, str], modifier_of: Dict[str, str], features: FrozenSet[str]) -> tuple:
    """The optional arguments a kernel implementing only ``features`` does not take."""
    omit = tuple(arg for arg, feature in feature_of.items() if feature not in features)
    return omit + tuple(arg for arg, base in modifier_of.items() if base in omit)


def check_all(pairs) -> None:
    """``torch._check(a == b)`` for each ``(a, b, what)`` (in fakes: shapes may be symbolic)."""
    for a, b, what in pairs:
        torch._check(a == b, lambda what=what, a=a, b=b: f"{what}: {a} != {b}")
