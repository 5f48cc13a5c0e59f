"""What one backend can run of one op, as data: the :class:`Capability` record.

Each op folder (``kvmem/ops/<op>/capabilities.py``) registers one record per backend that
implements it; the dispatcher (:mod:`kvmem.dispatch.select`) and :func:`kvmem.dispatch.explain`
read only these records. A call that uses a feature (an optional argument) that the record does
not declare rejects the backend with a reason: a backend is never handed an argument it would
drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

SAME_AS_DTYPE = "same as dtype"  # cache_dtypes: the cache must be in the call's dtype

Rejection = Optional[Tuple[str, str]]  # (kind, reason): "inapplicable" (silent) or "fallback" (logged once)


@dataclass(frozen=True)
class Capability:
    """What ``backend`` runs of ``op``, and the callable that runs it.

    Attributes
    ----------
    op, backend: names (``"paged_attention"``, ``"cuda"``)
    run: ``run(params) -> None``, the implementation; ``params`` is the op's parameter object
        (``kvmem/ops/<op>/params.py``), outputs included
    devices: device types whose tensors it takes
    dtypes: the call's dtypes it takes (None: any); ignored when ``from_build``
    cache_dtypes: cache dtypes (None: any; ``SAME_AS_DTYPE``: only the call's dtype)
    head_dims: the head dims it takes (empty: any up to ``max_head_dim``; None for both: any)
    max_head_dim: the largest head dim (None: no limit)
    max_block_size: the largest page size (None: no limit)
    features: the optional arguments it implements (feature names, see each op's params.FEATURES)
    max_seqlen_q: the longest query segment it takes (None: any)
    needs_aligned: rows of q and the caches must start on 16-byte boundaries
    from_build: dtypes/head_dims/max_head_dim come from the compiled build
        (``kvmem._ext.build_info()["kernels"][op][device]``), not from this record
    kernels_of: a composite op (one built from another op's kernels on this backend): the op
        whose compiled kernels it runs, whose build facts and availability are this record's
        (None: the record's own op)
    """

    op: str
    backend: str
    run: Callable
    devices: Tuple[str, ...] = ("cpu", "cuda")
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    cache_dtypes: object = SAME_AS_DTYPE
    head_dims: Tuple[int, ...] = ()
    max_head_dim: Optional[int] = None
    max_block_size: Optional[int] = None
    features: FrozenSet[str] = field(default_factory=frozenset)
    max_seqlen_q: Optional[int] = None
    needs_aligned: bool = False
    from_build: bool = False
    kernels_of: Optional[str] = None

    @property
    def kernel_op(self) -> str:
        """The op whose compiled kernels this record runs (``kernels_of`` or ``op``)."""
        return self.kernels_of or self.op

    def rejects(self, call) -> Rejection:
        """Why this record does not cover ``call`` (a ``fallback`` rejection), or None."""
        missing = call.features - self.features
        if missing:
            return ("fallback", f"feature(s) {sorted(missing)} not implemented")
        if self.dtypes is not None and call.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            word = "compiled" if self.from_build else "supported"
            return ("fallback", f"dtype {call.dtype} not {word} (built for {names})")
        if call.cache_dtype is not None:
            if self.cache_dtypes == SAME_AS_DTYPE and call.cache_dtype != call.dtype:
                return ("fallback", f"cache dtype {call.cache_dtype} differs from q dtype {call.dtype}")
            if isinstance(self.cache_dtypes, tuple) and call.cache_dtype not in self.cache_dtypes:
                return ("fallback", f"cache dtype {call.cache_dtype} not supported")
        if self.head_dims and call.head_dim not in self.head_dims:
            return ("fallback", f"head_dim {call.head_dim} not in the built {self.head_dims}")
        if self.max_head_dim is not None and call.head_dim > self.max_head_dim:
            return ("fallback", f"head_dim {call.head_dim} > {self.max_head_dim}")
        if self.max_block_size is not None and not 1 <= call.block_size <= self.max_block_size:
            return ("fallback", f"block_size {call.block_size} not in [1, {self.max_block_size}]")
        if self.max_seqlen_q is not None and call.max_seqlen_q > self.max_seqlen_q:
            return ("fallback", f"query segments longer than {self.max_seqlen_q} (prefill) go to the prefill kernels")
        if self.needs_aligned and not call.aligned:
            return ("fallback", "q/cache rows not 16-byte aligned")
        return None


_CAPABILITIES: Dict[Tuple[str, str], Capability] = {}


def register(*capabilities: Capability) -> None:
    """Declare what a backend runs of an op (called by each op folder at import)."""
    for cap in capabilities:
        _CAPABILITIES[(cap.op, cap.backend)] = cap


def capability(op: str, backend: str) -> Optional[Capability]:
    """The record of ``(op, backend)``, or None when the backend does not implement the op."""
    return _CAPABILITIES.get((op, backend))


def capabilities() -> Dict[Tuple[str, str], Capability]:
    """Every registered record, by ``(op, backend)``."""
    return dict(_CAPABILITIES)
