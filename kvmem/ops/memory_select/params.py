"""``MemorySelectParams``: one ``memory_select`` call (flattened only at the ``torch.library``
boundary, in the order of the ``kvmem::memory_select`` schema)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from kvmem.dispatch import Call, describe
from kvmem.ops._common import features_of

OP = "memory_select"

FEATURE_OF = {"query_index": "query_index"}  # optional arguments a backend must declare
MODIFIER_OF: dict = {}
COMMON = ("scale", "summary")  # every backend implements these (both summary kinds)


@dataclass(frozen=True, eq=False)
class MemorySelectParams:
    """Arguments of one ``memory_select`` call, the output first (meaning: ``kvmem.ops.memory_select``).

    ``top_k`` is ``selected.shape[2]``; ``scale`` is always set (the default resolved).
    """

    selected: torch.Tensor
    q: torch.Tensor
    summaries: torch.Tensor
    bank_table: torch.Tensor
    bank_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    scale: float
    query_index: Optional[torch.Tensor] = None
    summary: str = "minmax"

    @classmethod
    def build(cls, q, summaries, bank_table, bank_lens, cu_seqlens_q, top_k, *, scale=None, query_index=None,
              summary="minmax") -> "MemorySelectParams":
        """From the public arguments (already validated): default scale, output allocated."""
        selected = torch.empty((bank_table.shape[0], summaries.shape[1], top_k), dtype=torch.int32, device=q.device)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        # the kernels index the tables by row with unit column / element strides: a strided view
        # (e.g. ``wide[:, ::2]``) is copied here (a no-op for the contiguous tensors of the layer path)
        bank_table, bank_lens, cu_seqlens_q = bank_table.contiguous(), bank_lens.contiguous(), cu_seqlens_q.contiguous()
        query_index = None if query_index is None else query_index.contiguous()
        return cls(selected, q, summaries, bank_table, bank_lens, cu_seqlens_q, scale, query_index, summary)

    @property
    def top_k(self) -> int:
        return self.selected.shape[2]

    def to_schema(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_schema(cls, *args) -> "MemorySelectParams":
        return cls(*args)

    @property
    def features(self):
        return features_of(FEATURE_OF, dict(query_index=self.query_index))

    def call(self) -> Call:
        return describe_call(self.q, self.summaries, self.query_index)


@describe(OP)
def describe_call(q, summaries, query_index=None) -> Call:
    """``Call.memory_select(q, summaries, query_index)``: the dispatcher's view of a call."""
    return Call(OP, q.device.type, q.dtype, q.shape[-1], 0, q.shape[1], summaries.shape[1], summaries.dtype,
                features_of(FEATURE_OF, dict(query_index=query_index)))
