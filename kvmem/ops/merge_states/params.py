"""``MergeStatesParams``: one ``merge_states`` call (flattened only at the ``torch.library``
boundary, in the order of the ``kvmem::merge_states`` schema)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvmem.dispatch import Call, describe

OP = "merge_states"

FEATURE_OF: dict = {}  # no optional arguments
MODIFIER_OF: dict = {}
COMMON: tuple = ()


@dataclass(frozen=True, eq=False)
class MergeStatesParams:
    """Arguments of one ``merge_states`` call, outputs first (meaning: ``kvmem.merge_states``)."""

    out: torch.Tensor
    lse: torch.Tensor
    out_a: torch.Tensor
    lse_a: torch.Tensor
    out_b: torch.Tensor
    lse_b: torch.Tensor

    @classmethod
    def build(cls, out_a, lse_a, out_b, lse_b) -> "MergeStatesParams":
        out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
        lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
        return cls(out, lse, out_a, lse_a, out_b, lse_b)

    def to_schema(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_schema(cls, *args) -> "MergeStatesParams":
        return cls(*args)

    features = frozenset()

    def call(self) -> Call:
        return describe_call(self.out_a)


@describe(OP)
def describe_call(out_a) -> Call:
    """``Call.merge_states(out_a)``: the dispatcher's view of a call."""
    return Call(OP, out_a.device.type, out_a.dtype, out_a.shape[-1], 0, out_a.shape[1])
