"""What each backend runs of ``paged_attention``, as data (read by ``kvmem.dispatch``).

The compiled backends' dtypes, head dims and cache dtypes come from the build
(``kvmem._ext.build_info()["kernels"]["paged_attention"][device]``), not from here.
"""

from __future__ import annotations

import functools
import importlib

from kvmem import _ext
from kvmem.dispatch import Capability, register
from kvmem.ops._common import flat, omitted_args
from kvmem.ops.paged_attention import configs, reference
from kvmem.ops.paged_attention.params import FEATURE_OF, MODIFIER_OF, OP

ALL_FEATURES = frozenset(FEATURE_OF.values())
KERNEL_FEATURES = frozenset({"window", "softcap", "sink_logits"})  # what every compiled and Triton kernel implements
CPU_FEATURES = KERNEL_FEATURES | {"rope", "kv_scale"}  # float8 / scaled / other-dtype float caches
# compile-checked only (nvcc_check): no GPU here. kv_scale: float8 / 16-bit caches with scales; the
# cache dtypes (q's, the other 16-bit float, float8) come from the build facts (cache_dtypes).
CUDA_FEATURES = KERNEL_FEATURES | {"rope", "kv_scale"}
TRITON_FEATURES = KERNEL_FEATURES | {"rope", "kv_scale"}  # kv_scale: float8 and scaled float caches
# Longest query segment the CUDA kernels take (they are decode kernels: one row per query token
# and head-in-group); longer segments (prefill) go to another backend.
CUDA_MAX_SEQLEN_Q = 16


@functools.lru_cache(maxsize=None)
def _omitted(features) -> tuple:
    return omitted_args(FEATURE_OF, MODIFIER_OF, features)


def _kernel_args(params, features) -> tuple:
    """The schema arguments a kernel implementing ``features`` takes (it is never given others)."""
    return flat(params, _omitted(features))


def run_reference(p) -> None:
    o, lse = reference.paged_attention(
        p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, p.cu_seqlens_q, p.max_seqlen_q, p.max_seqlen_k,
        scale=p.scale, causal=p.causal, window=p.window, softcap=p.softcap, sink_logits=p.sink_logits,
        k_scale=p.k_scale, v_scale=p.v_scale, rope_cos_sin=p.rope_cos_sin, rope_neox=p.rope_neox)
    p.out.copy_(o)
    if p.lse is not None:
        p.lse.copy_(lse)


def _compiled_args(params, features) -> tuple:
    """The ``kvmem_C::paged_attention`` arguments: its schema is ``kvmem::paged_attention``'s."""
    _kernel_args(params, features)  # first: raises if params uses an argument the kernel lacks
    return params.to_schema()


def run_cpu(p) -> None:
    _ext.get_op(OP)(*_compiled_args(p, CPU_FEATURES))


def run_cuda(p) -> None:
    _ext.get_op(OP)(*_compiled_args(p, CUDA_FEATURES))


def run_triton(p) -> None:
    args = _kernel_args(p, TRITON_FEATURES)
    importlib.import_module("kvmem.ops.paged_attention.triton").paged_attention(*args)


CAPABILITIES = (
    Capability(OP, "cuda", run_cuda, devices=("cuda",), from_build=True, features=CUDA_FEATURES,
               max_seqlen_q=CUDA_MAX_SEQLEN_Q, needs_aligned=True),
    Capability(OP, "triton", run_triton, devices=("cuda",), dtypes=configs.SUPPORTED_DTYPES,
               cache_dtypes=configs.SUPPORTED_CACHE_DTYPES, head_dims=configs.SUPPORTED_HEAD_DIMS,
               max_block_size=configs.MAX_PAGE_SIZE, features=TRITON_FEATURES),
    Capability(OP, "cpu", run_cpu, devices=("cpu",), from_build=True, features=CPU_FEATURES),
    Capability(OP, "reference", run_reference, cache_dtypes=None, features=ALL_FEATURES),
)
register(*CAPABILITIES)
