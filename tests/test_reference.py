"""The specification itself, checked against dense attention on contiguous copies."""

import math

import pytest
import torch
import torch.nn.functional as F

from cases import FEATURES, MODES, make_case
from kvmem.ops import reference
from tolerances import DENSE


def dense_kv(case, b):
    """Contiguous [kv_len, Hkv, D] fp32 copies of sequence b's keys/values (NaN where freed)."""
    kv_len = int(case.seq_lens[b])
    bs = case.k_cache.shape[1]
    k = torch.full((kv_len, *case.k_cache.shape[2:]), math.nan)
    v = torch.full_like(k, math.nan)
    for j in range(kv_len):
        blk = int(case.block_table[b, j // bs])
        if blk >= 0:
            k[j] = case.k_cache[blk, j % bs].float()
            v[j] = case.v_cache[blk, j % bs].float()
    return k, v


def visible_mask(q_len, kv_len, causal, window):
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = torch.arange(kv_len)[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def dense_attention(case, b, use_sdpa):
    """Sequence b's attention: torch SDPA (plain/window) or fp64 math (softcap, sink)."""
    kw = case.kwargs
    s0, s1 = int(case.cu_seqlens_q[b]), int(case.cu_seqlens_q[b + 1])
    kv_len = int(case.seq_lens[b])
    k, v = dense_kv(case, b)
    mask = visible_mask(s1 - s0, kv_len, kw["causal"], kw.get("window"))
    seen = mask.any(0)
    k, v, mask = k[seen], v[seen], mask[:, seen]  # drop keys nobody sees (NaN after a window)
    group = case.q.shape[1] // k.shape[1]
    q = case.q[s0:s1].float().transpose(0, 1)  # [Hq, q, D]
    kk = k.repeat_interleave(group, 1).transpose(0, 1)
    vv = v.repeat_interleave(group, 1).transpose(0, 1)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=kw["scale"]).transpose(0, 1)
    s = (q.double() @ kk.double().transpose(1, 2)) * kw["scale"]
    if kw.get("softcap") is not None:
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    s = s.masked_fill(~mask, -math.inf)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    denom = e.sum(-1, keepdim=True)
    if kw.get("sink_logits") is not None:
        denom = denom + torch.exp(kw["sink_logits"].double().view(-1, 1, 1) - s.amax(-1, keepdim=True))
    return ((e / denom) @ vv.double()).float().transpose(0, 1)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_dense(mode, feature, block_size, group, causal):
    q_lens, kv_lens = MODES[mode]
    case = make_case(q_lens, kv_lens, num_heads=2 * group, num_kv_heads=2, head_dim=32,
                     block_size=block_size, causal=causal, **FEATURES[feature], seed=hash((mode, feature)) % 1000)
    out, lse = case.reference()
    assert not out.isnan().any()
    use_sdpa = feature in ("plain", "window")
    for b in range(len(q_lens)):
        s0, s1 = int(case.cu_seqlens_q[b]), int(case.cu_seqlens_q[b + 1])
        if s1 > s0:
            torch.testing.assert_close(out[s0:s1], dense_attention(case, b, use_sdpa), **DENSE)


def test_lse_is_log_denominator():
    case = make_case([3], [10], num_heads=2, num_kv_heads=1, head_dim=16, sink=True, seed=3)
    _, lse = case.reference()
    k, _ = dense_kv(case, 0)
    s = torch.einsum("qhd,khd->hqk", case.q.float(), k.repeat_interleave(2, 1)) * case.kwargs["scale"]
    s = s.masked_fill(~visible_mask(3, 10, True, None), -math.inf)
    expect = torch.logaddexp(torch.logsumexp(s, -1), case.kwargs["sink_logits"][:, None]).T
    torch.testing.assert_close(lse, expect, **DENSE)


def test_merge_states_of_split_equals_whole():
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


def test_merge_states_empty_partials():
    out = torch.randn(2, 2, 4)
    nan_out = torch.full_like(out, math.nan)
    lse = torch.randn(2, 2)
    empty = torch.full_like(lse, -math.inf)
    o, l = reference.merge_states(out, lse, nan_out, empty)
    torch.testing.assert_close(o, out)
    torch.testing.assert_close(l, lse)
    o, l = reference.merge_states(nan_out, empty, nan_out, empty)
    assert (o == 0).all() and (l == -math.inf).all()
