"""``Call``: what the dispatcher needs to know about one op call (hashable, so choices are cached).

The op folders register how to describe a call of their op (``describe(op)``);
``Call.<op>(...)`` is that description (``Call.paged_attention(q, k_cache, v_cache,
max_seqlen_q, window=128)``), so the dispatcher itself names no op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional

import torch

_DESCRIBERS: Dict[str, Callable[..., "Call"]] = {}


def describe(op: str):
    """Decorator: register ``fn(*args) -> Call`` as ``Call.<op>``."""
    def register(fn):
        _DESCRIBERS[op] = fn
        return fn
    return register


class _CallType(type):
    def __getattr__(cls, name):
        try:
            return _DESCRIBERS[name]
        except KeyError:
            raise AttributeError(f"type object 'Call' has no attribute {name!r} (no op {name!r} is registered)") from None


def aligned_16(t: torch.Tensor) -> bool:
    """Whether ``t``'s rows (every stride but the last) start on 16-byte boundaries."""
    if t.data_ptr() % 16:
        return False
    size = t.element_size()
    return not any((s * size) % 16 for s in t.stride()[:-1])


@dataclass(frozen=True)
class Call(metaclass=_CallType):
    """One op call as the capability records see it.

    ``block_size`` is 0 for ops without pages; ``max_seqlen_q`` the longest query segment
    (1 for ops without queries); ``features`` the optional arguments given (feature names).
    """

    op: str
    device_type: str
    dtype: torch.dtype
    head_dim: int
    block_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    cache_dtype: Optional[torch.dtype] = None
    features: FrozenSet[str] = field(default_factory=frozenset)
    max_seqlen_q: int = 1
    aligned: bool = True  # rows of q and the caches start on 16-byte boundaries
