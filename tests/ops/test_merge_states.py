"""merge_states vs the specification, by backend: the reference itself (a split attention merges
to the whole; empty partials), the C++ CPU op through the public entry point (``cpu``) and the
Triton kernel under the interpreter (``triton``). On a GPU, CUDA and compiled Triton merge_states
run in test_cache_write.py's ``test_cache_write_and_merge_gpu`` (one GPU case covers both ops).
"""

import importlib
import math

import pytest
import torch

import kvmem
from backends import on
from kvmem.ops import reference
from tolerances import DENSE, TRITON_LSE, TRITON_OUT, assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, BF16, F16]


@on("reference")
def test_merge_states_of_split_equals_whole(backend):
    """Attention over keys [0, n) == merge(attention over [0, m), attention over [m, n))."""
    torch.manual_seed(0)
    q = torch.randn(4, 3, 8)
    k, v = torch.randn(20, 3, 8), torch.randn(20, 3, 8)

    def part(lo, hi):
        s = torch.einsum("qhd,khd->qhk", q, k[lo:hi])
        lse = torch.logsumexp(s, -1)
        return torch.einsum("qhk,khd->qhd", torch.softmax(s, -1), v[lo:hi]), lse

    whole, lse = part(0, 20)
    merged, mlse = reference.merge_states(*part(0, 7), *part(7, 20))
    torch.testing.assert_close(merged, whole, **DENSE)
    torch.testing.assert_close(mlse, lse, **DENSE)


@on("reference")
def test_merge_states_empty_partials(backend):
    out = torch.randn(2, 2, 4)
    nan_out = torch.full_like(out, math.nan)
    lse = torch.randn(2, 2)
    empty = torch.full_like(lse, -math.inf)
    o, l = reference.merge_states(out, lse, nan_out, empty)
    torch.testing.assert_close(o, out)
    torch.testing.assert_close(l, lse)
    o, l = reference.merge_states(nan_out, empty, nan_out, empty)
    assert (o == 0).all() and (l == -math.inf).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@on("cpu")
def test_merge_states(backend, dtype):
    """The public op: empty partials (lse -inf, out garbage) on either side and on both."""
    g = torch.Generator().manual_seed(7)
    t, h, d = 9, 5, 96
    out_a, out_b = (torch.randn(t, h, d, generator=g).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(t, h, generator=g) * 4 for _ in range(2))
    lse_a[0], lse_b[1] = -math.inf, -math.inf  # empty partials...
    out_a[0] = math.nan  # ...whose out is garbage
    out_b[1] = math.nan
    lse_a[2], lse_b[2] = -math.inf, -math.inf
    out, lse = kvmem.merge_states(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = reference.merge_states(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any()
    assert_close(out, ref)
    assert_close(lse, ref_lse, what="lse")


@pytest.mark.parametrize("dtype,D,H", [(F32, 64, 3), (F16, 128, 8), (BF16, 80, 5), (F32, 256, 2)])
@on("triton")
def test_merge_states_kernel(backend, dtype, D, H):
    """The Triton kernel itself: empty partials, lse far apart, a non-contiguous lse."""
    ms = importlib.import_module("kvmem.ops.merge_states.triton")  # kvmem.ops.merge_states is the function
    gen = torch.Generator().manual_seed(D)
    T = 7
    oa = torch.randn(T, H, D, generator=gen).to(dtype)
    ob = torch.randn(T, H, D, generator=gen).to(dtype)
    la = torch.randn(T, H, generator=gen) * 3
    lb = torch.randn(T, H, generator=gen) * 3
    la[0, :] = -math.inf  # a empty
    oa[0] = math.nan
    lb[1, :] = -math.inf  # b empty
    ob[1] = math.nan
    la[2, 0] = lb[2, 0] = -math.inf  # both empty
    oa[2, 0] = ob[2, 0] = math.nan
    la[3, :] = 80.0  # far apart
    lb[3, :] = -80.0
    lb_nc = torch.randn(H, T, generator=gen).t()  # non-contiguous lse
    lb_nc.copy_(lb)
    o_ref, l_ref = reference.merge_states(torch.nan_to_num(oa), la, torch.nan_to_num(ob), lb)
    out = torch.full_like(oa, math.nan)
    lse = torch.full_like(la, math.nan)
    ms.merge_states(out, lse, oa, la, ob, lb_nc)
    torch.testing.assert_close(out.float(), o_ref.float(), **TRITON_OUT[dtype])
    torch.testing.assert_close(lse, l_ref, **TRITON_LSE)
