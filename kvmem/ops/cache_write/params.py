"""``CacheWriteParams``: one ``cache_write`` call (flattened only at the ``torch.library``
boundary, in the order of the ``kvmem::cache_write`` schema)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from kvmem.dispatch import Call, describe
from kvmem.ops._common import features_of

OP = "cache_write"

FEATURE_OF = {"k_scale": "kv_scale", "v_scale": "kv_scale"}  # optional arguments a backend must declare
MODIFIER_OF: dict = {}
COMMON: tuple = ()


@dataclass(frozen=True, eq=False)
class CacheWriteParams:
    """Arguments of one ``cache_write`` call (shapes and meaning: ``kvmem.cache_write``)."""

    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None

    def to_schema(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_schema(cls, *args) -> "CacheWriteParams":
        return cls(*args)

    @property
    def features(self):
        return features_of(FEATURE_OF, {name: getattr(self, name) for name in FEATURE_OF})

    def call(self) -> Call:
        return _call(self.k, self.k_cache, self.features)


def _call(k, k_cache, features) -> Call:
    return Call(OP, k_cache.device.type, k.dtype, k.shape[-1], k_cache.shape[1], 0, k_cache.shape[2],
                k_cache.dtype, features)


@describe(OP)
def describe_call(k, k_cache, k_scale=None, v_scale=None) -> Call:
    """``Call.cache_write(k, k_cache, k_scale)``: the dispatcher's view of a call."""
    return _call(k, k_cache, features_of(FEATURE_OF, dict(k_scale=k_scale, v_scale=v_scale)))
