"""Hypothesis shape fuzzing: the default CPU backend vs the reference (>= 200 cases)."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmem
from cases import make_case
from tolerances import assert_close

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


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_paged_attention_fuzz(spec):
    q_lens, kv_lens = spec.pop("q_lens"), spec.pop("kv_lens")
    case = make_case(q_lens, kv_lens, **spec)
    out = torch.full_like(case.q, math.nan)
    got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, out=out, return_lse=True)
    ref, ref_lse = case.reference()
    assert_close(got, ref)
    assert_close(lse, ref_lse, what="lse")
