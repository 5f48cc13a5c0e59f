"""torch.library.opcheck on every public op (schema, fake tensor, aot dispatch), on each CPU backend."""

import math

import pytest
import torch

import kvmem  # noqa: F401  (registers torch.ops.kvmem.*)
from cases import make_case
from kvmem import _ext

BACKENDS = ["reference"] + (["cpu"] if _ext.has_kernel("paged_attention", "cpu") else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("KVMEM_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("with_lse", [True, False])
def test_opcheck_paged_attention(backend, with_lse):
    case = make_case([3, 1], [9, 12], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                     window=6, softcap=4.0, sink=True, seed=1)
    out = torch.empty_like(case.q)
    lse = torch.empty(case.q.shape[:2]) if with_lse else None
    kw = case.kwargs
    args = (out, lse, *case.args(), kw["scale"], kw["causal"], kw["window"], kw["softcap"], kw["sink_logits"], None, None)
    torch.library.opcheck(torch.ops.kvmem.paged_attention.default, args)


def test_opcheck_cache_write(backend):
    k_cache = torch.full((3, 4, 2, 8), math.nan)
    v_cache = torch.full((3, 4, 2, 8), math.nan)
    args = (torch.randn(5, 2, 8), torch.randn(5, 2, 8), k_cache, v_cache, torch.tensor([0, 3, -1, 7, 11]))
    torch.library.opcheck(torch.ops.kvmem.cache_write.default, args)


def test_opcheck_merge_states(backend):
    args = (torch.empty(4, 3, 8), torch.empty(4, 3), torch.randn(4, 3, 8), torch.randn(4, 3),
            torch.randn(4, 3, 8), torch.randn(4, 3))
    torch.library.opcheck(torch.ops.kvmem.merge_states.default, args)


def test_compiles_fullgraph():
    """The ops trace into one graph under torch.compile (fake impls, mutation)."""
    case = make_case([1, 1], [9, 12], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=2)

    def step(q, k_cache, v_cache, table, seq_lens, cu):
        return kvmem.paged_attention(q, k_cache, v_cache, table, seq_lens, cu, 1, 16, check=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q)
    torch.testing.assert_close(got, case.reference()[0])
