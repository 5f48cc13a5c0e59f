"""What each backend runs of ``memory_select``, as data (read by ``kvmem.dispatch``).

The reference (torch ops on the tensors' device, no host sync) serves every device; the Triton
block-score kernel serves CUDA tensors (and CPU ones when forced with ``TRITON_INTERPRET=1``); the
C++ CPU kernel (``csrc/memory_select/``: scoring and top-k, fp32/bf16/fp16 q and summaries) serves
CPU tensors, its dtypes and head dims from the build. No CUDA kernel: the cuda backend has no record
(CUDA tensors take the Triton kernel).
"""

from __future__ import annotations

import importlib

from kvmem import _ext
from kvmem.dispatch import Capability, register
from kvmem.ops import _triton
from kvmem.ops._common import flat
from kvmem.ops.memory_select import reference
from kvmem.ops.memory_select.params import FEATURE_OF, OP

ALL_FEATURES = frozenset(FEATURE_OF.values())


def run_reference(p) -> None:
    p.selected.copy_(reference.memory_select(p.q, p.summaries, p.bank_table, p.bank_lens, p.cu_seqlens_q, p.top_k,
                                             scale=p.scale, query_index=p.query_index, summary=p.summary))


def run_compiled(p) -> None:
    _ext.get_op(OP)(*flat(p))


def run_triton(p) -> None:
    importlib.import_module("kvmem.ops.memory_select.triton").memory_select(*flat(p))


CAPABILITIES = (
    Capability(OP, "triton", run_triton, devices=("cuda",), dtypes=_triton.DTYPES, cache_dtypes=None,
               head_dims=_triton.HEAD_DIMS, features=ALL_FEATURES),
    Capability(OP, "cpu", run_compiled, devices=("cpu",), cache_dtypes=None, features=ALL_FEATURES, from_build=True),
    Capability(OP, "reference", run_reference, cache_dtypes=None, features=ALL_FEATURES),
)
register(*CAPABILITIES)
