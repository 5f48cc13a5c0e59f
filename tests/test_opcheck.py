"""torch.library.opcheck on every public op (schema, fake tensor, aot dispatch), on each CPU backend."""

import math
import os

import pytest
import torch

import kvmem  # noqa: F401  (registers torch.ops.kvmem.*)
from cases import make_case
from memory_cases import make_memory_case
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


# The memory ops: the reference, and the composite / kernel of each backend that can run here
# (Triton forced on CPU tensors under the interpreter, as tests/conftest.py sets it up).
MEMORY_ATTENTION_BACKENDS = BACKENDS + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
MEMORY_SELECT_BACKENDS = (["reference"] + (["cpu"] if _ext.has_kernel("memory_select", "cpu") else [])
                          + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))


@pytest.mark.parametrize("outputs", ["out", "lse", "lse_block_mass"])
@pytest.mark.parametrize("memory_backend", MEMORY_ATTENTION_BACKENDS)
def test_opcheck_memory_attention(memory_backend, outputs, monkeypatch):
    from kvmem.ops.memory_attention.params import MemoryAttentionParams

    if outputs == "lse_block_mass" and memory_backend != "reference":
        pytest.skip("block_mass: reference only (other backends fall back to it)")
    monkeypatch.setenv("KVMEM_BACKEND", memory_backend)
    case = make_memory_case([1, 3], [70, 90], num_heads=4, num_kv_heads=2, top_k=2, extra_bank=1, softcap=5.0,
                            sink_logits=True, seed=1)
    for c in (case.k_cache, case.v_cache):
        c.nan_to_num_(0.0)  # opcheck compares runs; NaN in unused slots is the op tests' job
    kw = case.memory_kwargs()
    if outputs == "lse_block_mass":
        kw["block_mass"] = torch.zeros(2, 2, case.bank_table.shape[1])
    params = MemoryAttentionParams.build(*case.args(), **kw, return_lse=outputs != "out")
    torch.library.opcheck(torch.ops.kvmem.memory_attention.default, params.to_schema())


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("memory_backend", MEMORY_SELECT_BACKENDS)
def test_opcheck_memory_select(memory_backend, with_index, monkeypatch):
    from kvmem.ops.memory_select.params import MemorySelectParams

    monkeypatch.setenv("KVMEM_BACKEND", memory_backend)
    q = torch.randn(5, 4, 64)
    summaries = torch.randn(6, 2, 2, 64)
    bank_table = torch.tensor([[0, 3, 5], [1, 2, -1]], dtype=torch.int32)
    index = torch.tensor([1, 4], dtype=torch.int32) if with_index else None
    params = MemorySelectParams.build(q, summaries, bank_table, torch.tensor([3, 2], dtype=torch.int32),
                                      torch.tensor([0, 2, 5], dtype=torch.int32), 2, query_index=index)
    torch.library.opcheck(torch.ops.kvmem.memory_select.default, params.to_schema())
