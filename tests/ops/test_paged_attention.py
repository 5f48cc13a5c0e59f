"""paged_attention vs the specification, by backend: the reference itself against dense attention
on contiguous copies (``reference``), and the C++ CPU kernels through the public op (``cpu``) over
the full product of page sizes, GQA ratios, head dims, dtypes, modes and features.

The Triton kernels' cases (interpreter-sized) are in test_paged_attention_triton.py, the GPU ones
(CUDA and compiled Triton, marked ``gpu``) in test_paged_attention_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from backends import on, run_and_compare
from cases import FEATURES, MODES, make_case
from tolerances import DENSE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# reference: the specification against dense attention
# ---------------------------------------------------------------------------------------------


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
@on("reference")
def test_reference_matches_dense(backend, causal, group, block_size, feature, mode):
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


@on("reference")
def test_lse_is_log_denominator(backend):
    case = make_case([3], [10], num_heads=2, num_kv_heads=1, head_dim=16, sink=True, seed=3)
    _, lse = case.reference()
    k, _ = dense_kv(case, 0)
    s = torch.einsum("qhd,khd->hqk", case.q.float(), k.repeat_interleave(2, 1)) * case.kwargs["scale"]
    s = s.masked_fill(~visible_mask(3, 10, True, None), -math.inf)
    expect = torch.logaddexp(torch.logsumexp(s, -1), case.kwargs["sink_logits"][:, None]).T
    torch.testing.assert_close(lse, expect, **DENSE)


# ---------------------------------------------------------------------------------------------
# cpu: the C++ kernels through the public op (KVMEM_BACKEND=cpu), the full product
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Run with one intra-op thread. The product's sequences are short (<= 70 keys), so the kernel
    never splits their key ranges (it splits only with > 1 thread and >= 512 keys) and its result
    does not depend on the thread count, while tiny ops with 2 threads on a loaded 2-core box
    cost ~10x more. Thread-parallel paths: test_threaded_modes_and_features and the long tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def modes_times_features(dtype, head_dim, block_size, group, seed0=0):
    """Every mode x every feature set for one (dtype, head dim, page size, group)."""
    num_kv_heads = 2 if group < 7 else 1
    seed = seed0
    for mode, (q_lens, kv_lens) in MODES.items():
        for feature, extra in FEATURES.items():
            seed += 1
            case = make_case(q_lens, kv_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, block_size=block_size, dtype=dtype, strided=seed % 2 == 0,
                             seed=seed, **extra)
            run_and_compare(case, f"{mode}/{feature}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
@on("cpu")
def test_paged_attention_product(backend, group, block_size, head_dim, dtype, one_thread):
    """The full product: every (dtype, head dim, page size, group) runs every mode with every
    feature set (20 cases per test, 9000 in all), q and the caches strided in every other case."""
    modes_times_features(dtype, head_dim, block_size, group, seed0=head_dim + block_size + 7 * group)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@on("cpu")
def test_threaded_modes_and_features(backend, dtype):
    """The product's modes x features once more with the default thread count (dynamic scheduling
    of the work items over several threads)."""
    assert torch.get_num_threads() >= 1
    modes_times_features(dtype, 128, 16, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@on("cpu")
def test_non_causal_and_long_decode(backend, dtype):
    """Non-causal prefill, and decode over long contexts where the kernel splits the keys."""
    run_and_compare(make_case([4, 9], [30, 9], causal=False, dtype=dtype, seed=1), "non-causal")
    run_and_compare(make_case([4, 9], [30, 9], causal=False, window=5, dtype=dtype, seed=2), "non-causal window")
    run_and_compare(make_case([1], [3000], num_heads=8, num_kv_heads=1, block_size=16, dtype=dtype, seed=3), "B=1 long")
    run_and_compare(make_case([1, 1], [2048, 5], num_heads=4, num_kv_heads=4, block_size=32, window=300,
                              softcap=10.0, sink=True, dtype=dtype, seed=4), "long window")


@on("cpu")
def test_long_prefill_tiles(backend):
    """Prefill longer than any query/key tile, with a cached prefix."""
    run_and_compare(make_case([130, 70], [300, 70], num_heads=6, num_kv_heads=2, head_dim=80, block_size=8, seed=5))
