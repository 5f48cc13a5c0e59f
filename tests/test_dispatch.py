"""The dispatcher: order, forcing, explanations, one log line per fallback."""

import logging

import pytest
import torch

import kvmem
from cases import make_case
from kvmem import _ext, backends
from tolerances import MERGE_SELF_FP32, TRITON_LSE, TRITON_OUT

CPU_BUILT = _ext.has_kernel("paged_attention", "cpu")


def call_for(case, **kw):
    return backends.Call.paged_attention(case.q, case.k_cache, **kw)


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv("KVMEM_BACKEND", raising=False)
    backends._select.cache_clear()
    backends._logged.clear()


def test_explain_names_every_backend():
    case = make_case([2], [5], head_dim=16)
    why = backends.explain(call_for(case))
    assert list(why) == ["cuda", "triton", "cpu", "reference"]
    assert why["cuda"].startswith("rejected: runs on cuda tensors")
    assert why["triton"].startswith("rejected: runs on cuda tensors")
    expected = "cpu" if CPU_BUILT else "reference"
    assert why[expected] == "selected"
    if not CPU_BUILT:
        assert "pip install --no-build-isolation" in why["cpu"]


@pytest.fixture
def cpu_without_kv_scale():
    """The C++ CPU record of paged_attention as if it did not implement scales (it does): the
    fallback machinery is tested on a feature the record lacks, whatever the build implements."""
    import dataclasses

    from kvmem.dispatch import capability, register

    cap = capability("paged_attention", "cpu")
    register(dataclasses.replace(cap, features=cap.features - {"kv_scale"}))
    backends._select.cache_clear()
    yield
    register(cap)
    backends._select.cache_clear()


@pytest.mark.skipif(not CPU_BUILT, reason="C++ extension not built")
def test_fallback_logs_once(caplog, cpu_without_kv_scale):
    case = make_case([2], [5], head_dim=16)
    kw = dict(k_scale=torch.tensor(0.5), v_scale=torch.tensor(2.0))
    with caplog.at_level(logging.WARNING, logger="kvmem"):
        for _ in range(3):
            out = kvmem.paged_attention(*case.args(), **case.kwargs, **kw)
    lines = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(lines) == 1 and "from cpu to reference" in lines[0].getMessage()
    ref = kvmem.ops.reference.paged_attention(*case.args(), **case.kwargs, **kw)[0]
    torch.testing.assert_close(out, ref)
    assert backends.explain(call_for(case, k_scale=kw["k_scale"]))["cpu"].startswith("rejected: feature")


def test_forced_backend(monkeypatch):
    case = make_case([2], [5], head_dim=16)
    monkeypatch.setenv("KVMEM_BACKEND", "reference")
    assert backends.select(call_for(case)).name == "reference"
    monkeypatch.setenv("KVMEM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="KVMEM_BACKEND=cuda cannot run paged_attention"):
        kvmem.paged_attention(*case.args(), **case.kwargs)
    monkeypatch.setenv("KVMEM_BACKEND", "tpu")
    with pytest.raises(ValueError, match="KVMEM_BACKEND must be one of"):
        kvmem.paged_attention(*case.args(), **case.kwargs)


def test_explain_with_a_forced_backend_that_cannot_run(monkeypatch, cpu_without_kv_scale):
    """KVMEM_BACKEND=cuda on CPU tensors: the call raises, explain() still lists every backend."""
    case = make_case([2], [5], head_dim=16)
    monkeypatch.setenv("KVMEM_BACKEND", "cuda")
    why = backends.explain(call_for(case))
    assert list(why) == ["cuda", "triton", "cpu", "reference"]
    assert why["cuda"].startswith("rejected (forced by KVMEM_BACKEND=cuda): runs on cuda tensors"), why
    assert why["triton"].startswith("rejected: runs on cuda tensors"), why
    assert why["cpu"] == "capable (not chosen)" if CPU_BUILT else why["cpu"].startswith("rejected: "), why
    assert why["reference"] == "capable (not chosen)", why
    assert "selected" not in why.values()
    with pytest.raises(RuntimeError, match="KVMEM_BACKEND=cuda cannot run paged_attention"):
        kvmem.paged_attention(*case.args(), **case.kwargs)
    # A forced backend that can run the call is the selected one; a feature it lacks is a
    # forced rejection too (no silent fallback when forced).
    monkeypatch.setenv("KVMEM_BACKEND", "reference")
    assert backends.explain(call_for(case))["reference"] == "selected"
    if CPU_BUILT:
        monkeypatch.setenv("KVMEM_BACKEND", "cpu")
        why = backends.explain(call_for(case, k_scale=torch.tensor(1.0)))
        assert why["cpu"].startswith("rejected (forced by KVMEM_BACKEND=cpu): feature"), why
        assert why["reference"] == "capable (not chosen)", why


def test_missing_extension_message():
    if CPU_BUILT:
        pytest.skip("extension is built")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _ext.get_op("paged_attention")


def test_forced_triton_runs_through_public_ops(monkeypatch):
    """KVMEM_BACKEND=triton with the interpreter: the public ops reach the Triton kernels."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KVMEM_BACKEND", "triton")
    case = make_case([1, 3], [9, 20], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, softcap=5.0, seed=5)
    assert backends.select(call_for(case, softcap=5.0)).name == "triton"
    out, lse = kvmem.paged_attention(*case.args(), **case.kwargs, return_lse=True)
    ref, ref_lse = case.reference()
    torch.testing.assert_close(out, ref, **TRITON_OUT[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TRITON_LSE)
    k_cache = case.k_cache.clone()
    kvmem.cache_write(torch.randn(2, 2, 64), torch.randn(2, 2, 64), k_cache, case.v_cache.clone(), torch.tensor([0, 5]))
    o, l = kvmem.merge_states(out, lse, out, lse)
    torch.testing.assert_close(o, out, **MERGE_SELF_FP32)
