"""Hypothesis shape fuzzing: the C++ CPU backend (forced, KVMEM_BACKEND=cpu) vs the reference
(>= 200 cases). Every call must reach the C++ kernels, never the reference backend, so the test
cannot compare the reference with itself."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmem
from cases import make_case
from kvmem import _ext, backends
from tolerances import assert_close

BUILT = _ext.has_kernel("paged_attention", "cpu")
if not BUILT and os.environ.get("KVMEM_REQUIRE_EXT") == "1":
    raise RuntimeError(f"KVMEM_REQUIRE_EXT=1 but the C++ CPU ops are missing: {_ext.load_error()}")
pytestmark = pytest.mark.skipif(not BUILT, reason=f"C++ extension not built: {_ext.load_error()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 4))
    q_lens, kv_lens = [], []
    for _ in range(batch):
        kv = draw(st.integers(0, 90))
        q_lens.append(draw(st.integers(0, min(kv, 12))))
        kv_lens.append(kv)
    num_kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 8))
    return dict(
        q_lens=q_lens, kv_lens=kv_lens, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from([8, 16, 64, 80, 96, 112, 128, 256])),
        block_size=draw(st.sampled_from([1, 2, 3, 8, 16, 32, 128, 256])),
        dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 40))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 30.0))),
        sink=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


RAN = {"cpu": 0, "reference": 0}


@pytest.fixture(scope="module", autouse=True)
def _force_cpu():
    """KVMEM_BACKEND=cpu for the module (a module-scoped fixture: hypothesis re-runs the test
    body without re-running function-scoped ones), counting which backend's kernel runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVMEM_BACKEND", "cpu")
        backends._select.cache_clear()
        for name in RAN:
            backend = backends.BY_NAME[name]

            def counted(op, params, _name=name, _run=backend.run):
                RAN[_name] += op == "paged_attention"
                return _run(op, params)

            mp.setattr(backend, "run", counted)
        yield
    backends._select.cache_clear()


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_paged_attention_fuzz(spec):
    q_lens, kv_lens = spec.pop("q_lens"), spec.pop("kv_lens")
    case = make_case(q_lens, kv_lens, **spec)
    call = backends.Call.paged_attention(case.q, case.k_cache, case.v_cache, case.max_seqlen_q,
                                         case.kwargs.get("window"), case.kwargs.get("softcap"),
                                         case.kwargs.get("sink_logits"))
    assert backends.select(call).name == "cpu"
    ran_before = dict(RAN)
    out = torch.full_like(case.q, math.nan)
    got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, out=out, return_lse=True)
    assert RAN["cpu"] == ran_before["cpu"] + 1 and RAN["reference"] == ran_before["reference"], RAN
    ref, ref_lse = case.reference()
    assert_close(got, ref)
    assert_close(lse, ref_lse, what="lse")
