"""What each backend runs of ``merge_states``, as data (read by ``kvmem.dispatch``); the compiled
backends' dtypes come from the build."""

from __future__ import annotations

import importlib

from kvmem import _ext
from kvmem.dispatch import Capability, register
from kvmem.ops._common import flat
from kvmem.ops.merge_states import reference
from kvmem.ops.merge_states.params import OP


def run_reference(p) -> None:
    out, lse = reference.merge_states(p.out_a, p.lse_a, p.out_b, p.lse_b)
    p.out.copy_(out)
    p.lse.copy_(lse)


def run_compiled(p) -> None:
    _ext.get_op(OP)(*flat(p))


def run_triton(p) -> None:
    importlib.import_module("kvmem.ops.merge_states.triton").merge_states(*flat(p))


CAPABILITIES = (
    Capability(OP, "cuda", run_compiled, devices=("cuda",), from_build=True),
    Capability(OP, "triton", run_triton, devices=("cuda",)),
    Capability(OP, "cpu", run_compiled, devices=("cpu",), from_build=True),
    Capability(OP, "reference", run_reference),
)
register(*CAPABILITIES)
