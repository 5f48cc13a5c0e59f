"""The schema's room for fp8 caches (k_scale/v_scale on write and load) and RoPE on load.

fp8 scales: only the reference implements them; the compiled backends fall back (one log line).
RoPE on load: the reference is checked against an independent formulation (RoPE applied before
caching, HF's ``rotate_half`` form or complex multiplication for interleaved pairs); every backend
that declares the "rope" feature is checked against the reference (tests/test_rope_on_load.py).
"""

import logging

import pytest
import torch

import kvmem
from kvmem import _ext, backends
from kvmem.ops import reference

from cases import MODES, make_case
from tolerances import FP8_E4M3, assert_close


def case_of(mode, group, **kw):
    q_lens, kv_lens = MODES[mode]
    return make_case(q_lens, kv_lens, num_heads=2 * group, num_kv_heads=2, **kw)


def rope_table(num_positions, rot_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv[None]  # [P, rot/2]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


def rotate_dense(x, positions, cos_sin, neox):
    """Independent RoPE: HF's rotate_half form (neox) or complex multiplication (interleaved)."""
    rot = cos_sin.shape[1]
    cos, sin = cos_sin[positions].double().chunk(2, dim=-1)
    xr, rest = x[..., :rot].double(), x[..., rot:]
    if neox:
        c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        half = torch.cat([-xr[..., rot // 2:], xr[..., : rot // 2]], dim=-1)
        y = xr * c + half * s
    else:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], rot // 2, 2).contiguous())
        y = torch.view_as_real(z * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]).flatten(-2)
    return torch.cat([y.to(x.dtype), rest], dim=-1)


def rotated_cache(case, cos_sin, neox):
    """A copy of the case's caches with every needed key rotated at its sequence position."""
    k = case.k_cache.clone()
    bs = k.shape[1]
    for b, L in enumerate(case.seq_lens.tolist()):
        pos = torch.arange(L)
        blocks, offs = case.block_table[b].long()[pos // bs], pos % bs
        k[blocks, offs] = rotate_dense(k[blocks, offs], pos, cos_sin, neox)
    return k


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("mode,rot", [("prefill_cached_prefix", 64), ("decode", 32), ("mixed", 64)])
def test_rope_on_load_equals_rope_before_caching(mode, rot, neox):
    case = case_of(mode, 3, head_dim=64, block_size=8, seed=rot + neox)
    cos_sin = rope_table(case.max_seqlen_k + 5, rot)
    out, lse = reference.paged_attention(*case.args(), scale=0.125, rope_cos_sin=cos_sin, rope_neox=neox)
    pre = case.args()
    pre = (pre[0], rotated_cache(case, cos_sin, neox)) + tuple(pre[2:])
    exp, exp_lse = reference.paged_attention(*pre, scale=0.125)
    assert_close(out, exp)
    assert_close(lse, exp_lse, what="lse")
    # RoPE changes the answer (the test can fail): unrotated keys give another result
    plain, _ = reference.paged_attention(*case.args(), scale=0.125)
    assert (plain - exp).abs().max() > 1e-2


def test_public_op_rope_runs_on_cpu_and_matches(caplog):
    case = case_of("mixed", 2, head_dim=64, block_size=16, seed=3)
    cos_sin = rope_table(case.max_seqlen_k, 64)
    call = backends.Call.paged_attention(case.q, case.k_cache, case.v_cache, case.max_seqlen_q,
                                         rope_cos_sin=cos_sin)
    why = backends.explain(call)
    if _ext.has_kernel("paged_attention", "cpu"):
        assert why["cpu"] == "selected", why
    else:
        assert why["reference"] == "selected"
    with caplog.at_level(logging.WARNING, logger="kvmem"):
        out = kvmem.paged_attention(*case.args(), rope_cos_sin=cos_sin, rope_neox=True)
    exp, _ = reference.paged_attention(*case.args(), scale=64 ** -0.5, rope_cos_sin=cos_sin)
    assert_close(out, exp)


def test_fp8_cache_write_and_load_round_trip():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    g = torch.Generator().manual_seed(0)
    T, H, D, nb, bs = 37, 2, 64, 8, 8
    k, v = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    k_scale = torch.tensor([0.008, 0.01])  # per kv head
    v_scale = torch.tensor(0.009)  # per tensor
    f8 = torch.float8_e4m3fn
    k_cache = torch.full((nb, bs, H, D), float("nan")).to(f8)
    v_cache = torch.full((nb, bs, H, D), float("nan")).to(f8)
    perm = torch.randperm(nb, generator=g)
    slots = torch.cat([perm[t // bs: t // bs + 1] * bs + t % bs for t in range(T)]).long()
    kvmem.cache_write(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    blocks, offs = slots // bs, slots % bs
    assert torch.equal(k_cache[blocks, offs].view(torch.uint8), (k / k_scale[:, None]).to(f8).view(torch.uint8))
    assert torch.equal(v_cache[blocks, offs].view(torch.uint8), (v / v_scale).to(f8).view(torch.uint8))
    # attention over the fp8 cache with scales == attention over the dequantised values (exact
    # semantics), and ~ attention over the unquantised values (fp8 rounding)
    q = torch.randn(3, 4, D, generator=g)
    table = torch.stack([perm[: (T + bs - 1) // bs]] * 3).int()
    seq_lens = torch.tensor([T, T - 1, 20], dtype=torch.int32)
    cu = torch.arange(4, dtype=torch.int32)
    out = kvmem.paged_attention(q, k_cache, v_cache, table, seq_lens, cu, 1, T, k_scale=k_scale, v_scale=v_scale)
    assert not torch.isnan(out).any()
    deq_k = torch.nan_to_num(k_cache.float()) * k_scale[:, None]
    deq_v = torch.nan_to_num(v_cache.float()) * v_scale
    exp, _ = reference.paged_attention(q, deq_k, deq_v, table, seq_lens, cu, 1, T, scale=D ** -0.5)
    assert_close(out, exp)
    k32, v32 = torch.zeros(nb, bs, H, D), torch.zeros(nb, bs, H, D)
    reference.cache_write(k, v, k32, v32, slots)
    exact, _ = reference.paged_attention(q, k32, v32, table, seq_lens, cu, 1, T, scale=D ** -0.5)
    assert_close(out, exact, **FP8_E4M3)


BAD = [
    (dict(rope_cos_sin=torch.zeros(64, 64, dtype=torch.float64)), TypeError, "rope_cos_sin"),
    (dict(rope_cos_sin=torch.zeros(64, 63)), ValueError, "rope_cos_sin"),
    (dict(rope_cos_sin=torch.zeros(64, 66)), ValueError, "rope_cos_sin"),
    (dict(rope_cos_sin=torch.zeros(3, 64)), ValueError, "max_seqlen_k"),
    (dict(rope_cos_sin=torch.zeros(64, 64), rope_neox=1), TypeError, "rope_neox"),
]


@pytest.mark.parametrize("kw,exc,word", BAD)
def test_rope_bad_input_names_argument_and_leaves_out(kw, exc, word):
    case = case_of("decode", 2, head_dim=64, block_size=8, seed=1)
    if "rope_cos_sin" in kw and kw["rope_cos_sin"].shape[0] == 64:
        kw = dict(kw, rope_cos_sin=torch.zeros(case.max_seqlen_k, kw["rope_cos_sin"].shape[1],
                                                dtype=kw["rope_cos_sin"].dtype))
    out = torch.full_like(case.q, 7.0)
    with pytest.raises(exc, match=word):
        kvmem.paged_attention(*case.args(), out=out, **kw)
    assert bool((out == 7.0).all())


@pytest.mark.parametrize("kw,word", [
    (dict(k_scale=torch.tensor(1.0)), "v_scale"),
    (dict(k_scale=torch.ones(3), v_scale=torch.ones(3)), "k_scale"),
    (dict(k_scale=torch.tensor(1.0, dtype=torch.float64), v_scale=torch.tensor(1.0)), "k_scale"),
])
def test_cache_write_scale_bad_input(kw, word):
    k = torch.randn(4, 2, 8)
    kc, vc = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    before = (kc.clone(), vc.clone())
    with pytest.raises((TypeError, ValueError), match=word):
        kvmem.cache_write(k, k.clone(), kc, vc, torch.arange(4), **kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_opcheck_with_rope_and_scales():
    case = case_of("mixed", 2, head_dim=64, block_size=8, seed=5)
    out = torch.empty_like(case.q)
    lse = torch.empty(case.q.shape[:2])
    cos_sin = rope_table(case.max_seqlen_k, 64)
    torch.library.opcheck(torch.ops.kvmem.paged_attention.default,
                          (out, lse, *case.args(), 0.125, True, 0, 0.0, None, None, None, cos_sin, False))
    k = torch.randn(4, 2, 8)
    kc, vc = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    torch.library.opcheck(torch.ops.kvmem.cache_write.default,
                          (k, k.clone(), kc, vc, torch.arange(4), torch.tensor(0.5), torch.tensor(0.5)))
