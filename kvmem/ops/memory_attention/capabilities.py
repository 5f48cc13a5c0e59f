"""What each backend runs of ``memory_attention``, as data (read by ``kvmem.dispatch``).

The cpu, triton and cuda backends run the composite of ``paged.py`` (compacted tables on the
device + one ``paged_attention`` per KV head) with ``paged_attention`` forced onto *that*
backend; their records are derived from that backend's ``paged_attention`` record (devices,
dtypes, head dims, page sizes, query-segment limit, and the features both ops have), so they
declare exactly what the paged kernels take, never ``block_mass`` (a call with it falls back to
the reference, logged once). The reference declares everything.
"""

from __future__ import annotations

import dataclasses
import functools

from kvmem import dispatch
from kvmem.dispatch import Capability, register
from kvmem.ops.memory_attention import paged, reference
from kvmem.ops.memory_attention.params import FEATURE_OF, OP
from kvmem.ops.paged_attention.params import OP as PAGED_OP, PagedAttentionParams

ALL_FEATURES = frozenset(FEATURE_OF.values())
COMPOSITE_BACKENDS = ("cuda", "triton", "cpu")
NOT_COMPOSITE = frozenset({"block_mass"})  # the composite does not compute it (reference only)


def run_reference(p) -> None:
    out, lse = reference.memory_attention(
        p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, p.cu_seqlens_q, p.max_seqlen_q, p.max_seqlen_k,
        sink_blocks=p.sink_blocks, window_start=p.window_start, bank_table=p.bank_table, selected=p.selected,
        scale=p.scale, softcap=p.softcap, sink_logits=p.sink_logits, k_scale=p.k_scale, v_scale=p.v_scale,
        rope_cos_sin=p.rope_cos_sin, rope_neox=p.rope_neox, block_mass=p.block_mass)
    p.out.copy_(out)
    if p.lse is not None:
        p.lse.copy_(lse)


@functools.lru_cache(maxsize=4096)
def _paged_rejection(backend: str, call, forced_name):
    del forced_name  # part of the key: a backend's verdict can depend on KVMEM_BACKEND (as dispatch.select's)
    return dispatch.BY_NAME[backend].rejects(call)


def paged_on(backend: str):
    """``paged_attention(q, k_cache, ..., out=, return_lse=, **kw)`` run on ``backend`` only (the
    way ``KVMEM_BACKEND`` forces one: a call it rejects raises, naming why)."""
    runner = dispatch.BY_NAME[backend]

    def run(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *, out,
            return_lse, **kw):
        params = PagedAttentionParams.build(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                                            max_seqlen_k, out=out, return_lse=return_lse, **kw)
        why = _paged_rejection(backend, params.call(), dispatch.forced())
        if why is not None:
            raise RuntimeError(f"kvmem: memory_attention on {backend} cannot run its paged_attention there: {why[1]}")
        runner.run(PAGED_OP, params)
        return (params.out, params.lse) if return_lse else params.out
    return run


def composite(backend: str, features: frozenset):
    """The ``run`` of ``backend``'s record (declaring ``features``): ``paged.memory_attention`` on
    ``backend``'s paged kernels."""
    paged_attention = paged_on(backend)

    def run(p) -> None:
        for arg, feature in FEATURE_OF.items():  # the second lock: an argument is never dropped
            if feature not in features and getattr(p, arg) is not None:
                raise RuntimeError(f"kvmem: {type(p).__name__}.{arg} is set but this kernel does not take it")
        paged.memory_attention(
            p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, p.cu_seqlens_q, p.max_seqlen_q, p.max_seqlen_k,
            sink_blocks=p.sink_blocks, window_start=p.window_start, bank_table=p.bank_table, selected=p.selected,
            scale=p.scale, softcap=p.softcap, sink_logits=p.sink_logits, k_scale=p.k_scale, v_scale=p.v_scale,
            rope_cos_sin=p.rope_cos_sin, rope_neox=p.rope_neox, out=p.out, lse=p.lse, paged_attention=paged_attention)
    return run


def composite_capability(backend: str) -> Capability:
    """``backend``'s paged_attention record, as this op's: what the paged kernels take, the
    features both ops have (not block_mass), ``kernels_of`` the paged op (its build facts)."""
    cap = dispatch.capability(PAGED_OP, backend)
    features = cap.features & (ALL_FEATURES - NOT_COMPOSITE)
    return dataclasses.replace(cap, op=OP, run=composite(backend, features), features=features,
                               kernels_of=cap.kernel_op)


CAPABILITIES = tuple(composite_capability(b) for b in COMPOSITE_BACKENDS) + (
    Capability(OP, "reference", run_reference, cache_dtypes=None, features=ALL_FEATURES),
)
register(*CAPABILITIES)
