"""What each backend runs of ``cache_write``, as data (read by ``kvmem.dispatch``); the compiled
backends' dtypes come from the build."""

from __future__ import annotations

import functools
import importlib

from kvmem import _ext
from kvmem.dispatch import Capability, register
from kvmem.ops import _triton
from kvmem.ops._common import flat, omitted_args
from kvmem.ops.cache_write import reference
from kvmem.ops.cache_write.params import FEATURE_OF, MODIFIER_OF, OP

ALL_FEATURES = frozenset(FEATURE_OF.values())
# Every kernel takes scales (float8 and float caches, kvmem's one encoding); the compiled ones'
# cache dtypes come from the build facts, Triton's from kvmem/ops/_triton.py (kvmem/ops/triton_fp8.py).
CPU_FEATURES = frozenset({"kv_scale"})
CUDA_FEATURES = frozenset({"kv_scale"})  # compile-checked only (nvcc_check): no GPU here
TRITON_FEATURES = frozenset({"kv_scale"})  # any float k/v into any float or float8 cache, scaled


@functools.lru_cache(maxsize=None)
def _omitted(features) -> tuple:
    return omitted_args(FEATURE_OF, MODIFIER_OF, features)


def _kernel_args(params, features) -> tuple:
    return flat(params, _omitted(features))


def run_reference(p) -> None:
    reference.cache_write(p.k, p.v, p.k_cache, p.v_cache, p.slot_mapping, p.k_scale, p.v_scale)


def _run_compiled(p, features) -> None:
    _kernel_args(p, features)  # first: raises if p uses an argument the kernel lacks
    _ext.get_op(OP)(*p.to_schema())  # kvmem_C::cache_write's schema is kvmem::cache_write's


def run_cpu(p) -> None:
    _run_compiled(p, CPU_FEATURES)


def run_cuda(p) -> None:
    _run_compiled(p, CUDA_FEATURES)


def run_triton(p) -> None:
    args = _kernel_args(p, TRITON_FEATURES)
    importlib.import_module("kvmem.ops.cache_write.triton").cache_write(*args)


CAPABILITIES = (
    Capability(OP, "cuda", run_cuda, devices=("cuda",), from_build=True, features=CUDA_FEATURES),
    Capability(OP, "triton", run_triton, devices=("cuda",), cache_dtypes=_triton.CACHE_DTYPES, features=TRITON_FEATURES),
    Capability(OP, "cpu", run_cpu, devices=("cpu",), from_build=True, features=CPU_FEATURES),
    Capability(OP, "reference", run_reference, cache_dtypes=None, features=ALL_FEATURES),
)
register(*CAPABILITIES)
