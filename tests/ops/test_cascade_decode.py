"""Shared-prefix (cascade) decode (``kvmem.ops.cascade_decode``) vs plain paged decode over the
full tables and vs the reference, by backend: the reference, the C++ CPU ops and Triton under the
interpreter (tiny shapes). Shuffled page ids; every unused slot of used pages and every unused page
holds NaN; rows with an empty suffix and suffixes ending mid-page; sink logits, softcap, fp32/bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvmem
from backends import on
from kvmem.ops import cascade, reference
from tolerances import OUT, LSE, TRITON_LSE, TRITON_OUT, assert_close

F32, BF16 = torch.float32, torch.bfloat16


def make(suffix_lens, *, shared_blocks=3, block_size=16, heads=(4, 1), head_dim=32, dtype=F32, sink=False,
         softcap=None, rope=False, seed=0):
    """A pool of NaN pages, shuffled ids: ``shared_blocks`` shared pages, then each row's own."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    own = [math.ceil(n / block_size) for n in suffix_lens]
    num_blocks = shared_blocks + sum(own) + 4  # unused pages stay NaN
    k_cache = torch.full((num_blocks, block_size, hkv, head_dim), math.nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared = [perm.pop() for _ in range(shared_blocks)]
    for blk in shared:
        k_cache[blk] = torch.randn(block_size, hkv, head_dim, generator=g).to(dtype)
        v_cache[blk] = torch.randn(block_size, hkv, head_dim, generator=g).to(dtype)
    width = max(own + [1]) + 1
    table = torch.full((len(suffix_lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(suffix_lens):
        for i in range(own[b]):
            blk = perm.pop()
            table[b, i] = blk
            m = min(block_size, n - i * block_size)  # mid-page: the rest of the page stays NaN
            k_cache[blk, :m] = torch.randn(m, hkv, head_dim, generator=g).to(dtype)
            v_cache[blk, :m] = torch.randn(m, hkv, head_dim, generator=g).to(dtype)
    q = torch.randn(len(suffix_lens), hq, head_dim, generator=g).to(dtype)
    kw = dict(scale=head_dim ** -0.5, softcap=softcap)
    if sink:
        kw["sink_logits"] = torch.randn(hq, generator=g)
    if rope:
        pos = torch.arange(shared_blocks * block_size + max(suffix_lens) + 1, dtype=torch.float32)
        inv = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        ang = pos[:, None] * inv[None]
        kw["rope_cos_sin"] = torch.cat([ang.cos(), ang.sin()], dim=1)
    shared_t = torch.tensor(shared, dtype=torch.int32)
    lens = torch.tensor(suffix_lens, dtype=torch.int32)
    # the same step as plain decode: full tables = shared pages + own pages
    full = torch.cat([shared_t.expand(len(suffix_lens), -1), table], dim=1)
    full_lens = lens + shared_blocks * block_size
    cu = torch.arange(len(suffix_lens) + 1, dtype=torch.int32)
    plain_args = (q, k_cache, v_cache, full, full_lens, cu, 1, int(full_lens.max()))
    return q, k_cache, v_cache, shared_t, table, lens, kw, plain_args


def tolerances(backend, dtype):
    if backend == "triton":
        return TRITON_OUT[dtype], TRITON_LSE
    return OUT[dtype], LSE


def check(backend, case):
    q, k_cache, v_cache, shared, table, lens, kw, plain_args = case
    out = torch.full_like(q, math.nan)  # every element must be written
    got, lse = kvmem.ops.cascade_decode(q, k_cache, v_cache, shared, table, lens, int(lens.max()), **kw,
                                        out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any() and not lse.isnan().any()
    ref, ref_lse = reference.paged_attention(*plain_args, **kw)
    plain, plain_lse = kvmem.paged_attention(*plain_args, **kw, return_lse=True)
    tol, lse_tol = tolerances(backend, q.dtype)
    assert_close(got, ref, **tol)
    assert_close(lse, ref_lse, what="lse", **lse_tol)
    if q.dtype == F32:
        assert_close(got, plain, **tol)
    else:  # cascade rounds both partials to q's dtype before the merge: one more rounding than plain
        assert_close(got, plain, atol=2 * tol["atol"], rtol=2 * tol["rtol"])
    assert_close(lse, plain_lse, what="lse", **lse_tol)


CPU_CASES = [
    # (suffix_lens, shared_blocks, block_size, (Hq, Hkv), features)
    ([1, 17, 0, 33], 3, 16, (4, 4), {}),                   # GQA 1, an empty suffix, mid-page ends
    ([5, 0, 16, 40, 2, 9], 4, 8, (8, 2), dict(sink=True)),  # GQA 4
    ([3, 30, 0], 2, 32, (8, 1), dict(softcap=4.0)),         # GQA 8
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 5, 1, (4, 1), dict(sink=True, softcap=3.0)),  # page size 1
    ([0, 0], 2, 16, (4, 2), {}),                           # only the prefix
    ([7, 25, 1, 12], 3, 16, (8, 2), dict(rope=True)),      # RoPE on load: suffix positions shifted
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("lens,shared,bs,heads,feat", CPU_CASES)
@on("reference", "cpu")
def test_cascade_equals_plain_decode(backend, dtype, lens, shared, bs, heads, feat):
    check(backend, make(lens, shared_blocks=shared, block_size=bs, heads=heads, dtype=dtype, **feat))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("lens,shared,bs,heads,feat", [
    ([1, 9, 0], 2, 8, (4, 1), dict(sink=True, softcap=3.0)),
    ([4, 0, 13, 2], 3, 4, (8, 2), {}),
])
@on("triton")
def test_cascade_equals_plain_decode_triton(backend, dtype, lens, shared, bs, heads, feat):
    check(backend, make(lens, shared_blocks=shared, block_size=bs, heads=heads, head_dim=64, dtype=dtype, **feat))


@on("cpu")
def test_cascade_batch_larger_than_prefix(backend):
    """More decode queries (one segment) than shared keys: causal=False, so positions do not matter."""
    check(backend, make([1] * 20 + [0, 5], shared_blocks=1, block_size=4, heads=(4, 2)))


@on("reference")
def test_cascade_fp8_scales(backend):
    """float8 pages with per-KV-head scales: the same scales in both parts."""
    q, kc, vc, shared, table, lens, kw, plain_args = make([3, 0, 18], shared_blocks=2, heads=(4, 2))
    ks, vs = torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])
    kc8 = (kc / ks[None, None, :, None]).to(torch.float8_e4m3fn)
    vc8 = (vc / vs[None, None, :, None]).to(torch.float8_e4m3fn)
    got, lse = kvmem.ops.cascade_decode(q, kc8, vc8, shared, table, lens, 18, **kw, k_scale=ks, v_scale=vs,
                                        return_lse=True)
    ref, ref_lse = reference.paged_attention(q, kc8, vc8, *plain_args[3:], **kw, k_scale=ks, v_scale=vs)
    assert_close(got, ref)
    assert_close(lse, ref_lse, what="lse")


@on("reference")
def test_cascade_errors(backend):
    q, kc, vc, shared, table, lens, kw, _ = make([3, 5], shared_blocks=2)
    with pytest.raises(TypeError, match="'shared_blocks' must be int32"):
        kvmem.ops.cascade_decode(q, kc, vc, shared.long(), table, lens, 5)
    with pytest.raises(ValueError, match="'block_table' must be of 2 rows"):
        kvmem.ops.cascade_decode(q, kc, vc, shared, table[:1], lens, 5)
    with pytest.raises(ValueError, match="'max_seqlen_k' must be >= the longest suffix"):
        kvmem.ops.cascade_decode(q, kc, vc, shared, table, lens, 4)
    with pytest.raises(ValueError, match="'shared_blocks' must be page ids in"):
        kvmem.ops.cascade_decode(q, kc, vc, torch.tensor([0, 999], dtype=torch.int32), table, lens, 5)
    bad = table.clone()
    bad[1, 0] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]=-1"):
        kvmem.ops.cascade_decode(q, kc, vc, shared, bad, lens, 5)


def test_shared_prefix_blocks():
    assert cascade.shared_prefix_blocks([[4, 7, 1, 2], [4, 7, 1, 9], [4, 7, 3]], 9) == 2
    assert cascade.shared_prefix_blocks([[4, 7, 1, 2], [4, 7, 1, 2]], 3) == 3  # only full pages
    assert cascade.shared_prefix_blocks([[-1, 7], [-1, 7]], 2) == 0  # a freed entry is not shared
    assert cascade.shared_prefix_blocks([], 4) == 0


@on("cpu")
def test_cascade_split_tables(backend):
    """``split_tables`` (views of the full tables, as the HF cache plans it) == the reference."""
    q, kc, vc, shared, table, lens, kw, plain_args = make([3, 0, 21, 8], shared_blocks=3, heads=(8, 2), sink=True)
    full, full_lens = plain_args[3], plain_args[4]
    plan = cascade.split_tables(full, full_lens, 3, kc.shape[1], int(full_lens.max()))
    assert plan.shared_table.tolist() == [shared.tolist()] and plan.max_suffix_len == 21
    ref, ref_lse = reference.paged_attention(*plain_args, **kw)
    pa = lambda *a, **k: kvmem.paged_attention(*a, check=False, **k)  # noqa: E731
    got, lse = cascade.run(pa, kvmem.merge_states, q, kc, vc, plan, **kw)
    assert_close(got, ref)
    assert_close(lse, ref_lse, what="lse")
    with pytest.raises(ValueError, match="'fuse' must be False with sink_logits"):
        cascade.run(pa, kvmem.merge_states, q, kc, vc, plan, **kw, fuse=True)
    kw.pop("sink_logits")
    ref, ref_lse = reference.paged_attention(*plain_args, **kw)
    for fuse in (True, False):  # one call over [q; q], or two
        got, lse = cascade.run(pa, kvmem.merge_states, q, kc, vc, plan, **kw, fuse=fuse)
        assert_close(got, ref)
        assert_close(lse, ref_lse, what="lse")


def test_kernel_ops_named_backend_that_cannot_returns_none(caplog):
    """A model patched with a backend that cannot run a part (here cuda, on CPU tensors): None (the
    layer then runs plain decode, which names the problem), one log line."""
    import logging

    from kvmem.ops.kernel_ops import KernelOps

    q, kc, vc, shared, table, lens, kw, _ = make([3, 5], shared_blocks=2)
    plan = cascade.plan_cascade(shared, table, lens, 5, kc.shape[1])
    with caplog.at_level(logging.WARNING, logger="kvmem"):
        assert KernelOps("cuda").cascade_decode(q, kc, vc, plan, scale=kw["scale"]) is None
        assert KernelOps("cuda").cascade_decode(q, kc, vc, plan, scale=kw["scale"]) is None
    assert len([r for r in caplog.records if "cascade_decode falls back" in r.getMessage()]) <= 1
    got = KernelOps("reference").cascade_decode(q, kc, vc, plan, scale=kw["scale"])
    ref, _ = reference.paged_attention(*make([3, 5], shared_blocks=2)[7], **kw)
    assert_close(got, ref)


@on("cpu")
def test_cascade_compiles_fullgraph(backend):
    """The HF layer step's call (``KernelOps.cascade_decode``, auto backend) under
    ``torch.compile(fullgraph=True)``: the parts go through the public custom ops."""
    from kvmem.ops.kernel_ops import KernelOps

    q, kc, vc, shared, table, lens, kw, plain_args = make([3, 0, 9, 17], shared_blocks=2, heads=(4, 2), sink=True)
    plan = cascade.plan_cascade(shared, table, lens, 17, kc.shape[1])
    ops = KernelOps("auto")
    f = torch.compile(lambda q: ops.cascade_decode(q, kc, vc, plan, scale=kw["scale"], sink_logits=kw["sink_logits"]),
                      fullgraph=True)
    ref, _ = reference.paged_attention(*plain_args, **kw)
    try:
        assert_close(f(q), ref)
    finally:
        torch._dynamo.reset()
