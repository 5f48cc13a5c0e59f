"""memory_select and block summaries on every backend (the reference; the Triton block-score
kernel forced under the interpreter): independent scoring, the reference's scores and selections
(sets, ignoring blocks within tolerance of the k-th score), tie order, padding, the Quest bound,
bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.ops.memory_select import block_scores, compute_summaries, memory_select, write_summaries
from kvmem.ops.memory_select.reference import head_scores
from memory_cases import force_backend, memory_backends

BLOCK_SIZE = 16
# (num_heads, num_kv_heads): GQA groups 1, 3, 4, 7, 8.
GROUPS = [(2, 2), (6, 2), (4, 1), (7, 1), (8, 1)]
BACKENDS = memory_backends("memory_select")
SCORE_TOL = 1e-5  # fp32 scores of two backends differ in the last bits (summation order)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    force_backend(monkeypatch, request.param)
    return request.param


# The interpreter is slow: under Triton the selection tests take two summary kinds (a channel-wise
# one and a vector one); test_triton_scores_equal_the_reference checks every kind's scores there.
TRITON_SUMMARIES = ("minmax", "mean")


def interpreter_subset(backend, summary):
    if backend == "triton" and summary not in TRITON_SUMMARIES:
        pytest.skip(f"summary {summary!r} under Triton: its scores are checked by test_triton_scores_equal_the_reference")


def assert_same_selection(got, scores, top_k, tol=SCORE_TOL):
    """``got`` [B, Hkv, top_k] is a valid top-k of ``scores`` [B, Hkv, max_bank]: ascending, -1
    padded, ``min(top_k, live)`` entries, every block clearly above the k-th score selected and
    none clearly below (blocks within ``tol`` of the k-th score may go either way)."""
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            row = scores[b, h].double()
            live = int(torch.isfinite(row).sum())
            chosen = [int(i) for i in got[b, h] if i >= 0]
            assert chosen == sorted(set(chosen)) and len(chosen) == min(top_k, live), (b, h, chosen)
            assert got[b, h, len(chosen):].eq(-1).all()
            if not chosen:
                continue
            kth = float(torch.sort(row, descending=True, stable=True).values[len(chosen) - 1])
            band = tol * max(1.0, abs(kth))
            sure = {j for j in range(row.shape[0]) if row[j] > kth + band}
            assert sure <= set(chosen), (b, h, chosen, sure)
            assert all(row[j] >= kth - band for j in chosen), (b, h, chosen)


def _bank(bank_lens, *, num_kv_heads=2, head_dim=64, q_lens=None, num_heads=None, seed=0, dtype=torch.float32):
    """Random full pages in a shuffled pool (unused pages NaN), one bank per row."""
    g = torch.Generator().manual_seed(seed)
    num_heads = num_heads or 2 * num_kv_heads
    q_lens = q_lens or [1] * len(bank_lens)
    num_blocks = sum(bank_lens) + 4
    k_cache = torch.full((num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), math.nan, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    bank_table = torch.full((len(bank_lens), max(bank_lens + [0]) + 1), -1, dtype=torch.int32)
    for b, n in enumerate(bank_lens):
        for j in range(n):
            page = perm.pop()
            k_cache[page] = torch.randn(BLOCK_SIZE, num_kv_heads, head_dim, generator=g).to(dtype)
            bank_table[b, j] = page
    summaries = torch.full((num_blocks, num_kv_heads, 2, head_dim), math.nan)
    live = bank_table[bank_table >= 0]
    write_summaries(summaries, k_cache, live)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k_cache, summaries, bank_table, torch.tensor(bank_lens, dtype=torch.int32), cu


def _head_score(qh, keys, summary):
    """fp64 per-head score of one page's keys [bs, D], straight from its keys."""
    if summary == "minmax":
        return float(torch.maximum(qh * keys.min(0).values, qh * keys.max(0).values).sum())
    centre = keys.mean(0)
    if summary == "mean":
        return float(qh @ centre)
    if summary == "box":
        return float((qh * centre + qh.abs() * (keys - centre).abs().mean(0)).sum())
    dist = [float((k - centre).square().sum()) for k in keys]  # reps: the two keys farthest from the mean
    far = sorted(range(len(dist)), key=lambda t: (-dist[t], t))[:2]
    return max(float(qh @ keys[t]) for t in far)


def _independent_scores(q, k_cache, bank_table, bank_lens, cu, summary="minmax"):
    """fp64, one (row, KV head, bank position) at a time, straight from the page's keys; the group
    rule: max over the group's query heads of the head's log-softmax over the row's positions."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    scores = {}
    for b in range(bank_table.shape[0]):
        n = int(bank_lens[b])
        if cu[b + 1] == cu[b] or n == 0:
            continue
        qt = q[int(cu[b])].double()
        for h in range(num_kv_heads):
            best = [-math.inf] * n
            for hq in range(h * group, (h + 1) * group):
                per = [_head_score(qt[hq], k_cache[int(bank_table[b, j]), :, h].double(), summary) / math.sqrt(head_dim)
                       for j in range(n)]
                top = max(per)
                lse = top + math.log(sum(math.exp(x - top) for x in per))
                best = [max(x, y - lse) for x, y in zip(best, per)]
            for j in range(n):
                scores[b, h, j] = best[j]
    return scores


@pytest.mark.parametrize("summary", ["minmax", "box", "reps", "mean"])
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
def test_matches_independent_scoring(heads, summary, backend):
    interpreter_subset(backend, summary)
    bank_lens, top_k = [9, 0, 3, 14], 4
    q, k_cache, _, bank_table, lens, cu = _bank(bank_lens, num_heads=heads[0], num_kv_heads=heads[1],
                                                q_lens=[1, 2, 5, 1], seed=heads[0])
    summaries = torch.full((k_cache.shape[0],) + k_cache.shape[2:3] + (2, k_cache.shape[3]), math.nan)
    write_summaries(summaries, k_cache, bank_table[bank_table >= 0], summary=summary)
    selected = memory_select(q, summaries, bank_table, lens, cu, top_k, summary=summary)
    assert selected.shape == (4, heads[1], top_k) and selected.dtype == torch.int32
    want = _independent_scores(q, k_cache, bank_table, lens, cu, summary)
    for b, n in enumerate(bank_lens):
        for h in range(heads[1]):
            got = [int(i) for i in selected[b, h] if i >= 0]
            assert got == sorted(got) and len(got) == min(top_k, n)
            assert selected[b, h, len(got):].eq(-1).all()
            ranked = sorted(range(n), key=lambda j: (-want[b, h, j], j))
            if not ranked:
                continue
            kth = want[b, h, ranked[min(top_k, n) - 1]]
            sure = {j for j in ranked[:top_k] if abs(want[b, h, j] - kth) > 1e-5}
            assert sure <= set(got), (b, h, got, ranked[:top_k])
            assert all(want[b, h, j] >= kth - 1e-5 for j in got)


def test_scores_and_padding(backend):
    q, _, summaries, bank_table, lens, cu = _bank([5, 2, 0], seed=4)
    scores = block_scores(q, summaries, bank_table, lens, cu)
    assert scores.shape == (3, 2, bank_table.shape[1])
    assert torch.isinf(scores[0, :, 5:]).all() and torch.isinf(scores[2]).all() and scores[0, :, :5].isfinite().all()
    selected = memory_select(q, summaries, bank_table, lens, cu, 3)
    assert selected[1].tolist() == [[0, 1, -1], [0, 1, -1]]  # top_k > bank size: all, -1 padded
    assert selected[2].eq(-1).all()  # empty bank
    assert memory_select(q, summaries, bank_table, lens, cu, 0).shape == (3, 2, 0)  # StreamingLLM



def test_strided_tables_equal_contiguous_ones(backend):
    """Views with non-unit strides (a column-strided bank table, every other element of the lengths
    and query indices) select exactly what their contiguous copies do."""
    q, _, summaries, bank_table, lens, cu = _bank([6, 3, 5], q_lens=[2, 1, 3], seed=11)
    wide = torch.full((bank_table.shape[0], 2 * bank_table.shape[1]), -7, dtype=torch.int32)
    wide[:, ::2] = bank_table
    lens2 = torch.stack([lens, torch.full_like(lens, 99)], 1).reshape(-1)[::2]
    qi = cu[:-1].clone()
    qi2 = torch.stack([qi, torch.full_like(qi, -5)], 1).reshape(-1)[::2]
    assert wide[:, ::2].stride(1) == 2 and lens2.stride(0) == 2 and qi2.stride(0) == 2
    want = memory_select(q, summaries, bank_table, lens, cu, 3, query_index=qi)
    got = memory_select(q, summaries, wide[:, ::2], lens2, cu, 3, query_index=qi2)
    assert torch.equal(got, want)

def test_ties_take_the_lower_position(backend):
    q, k_cache, summaries, bank_table, lens, cu = _bank([6], seed=5)
    page = bank_table[0, 4]
    for j in (1, 2, 5):  # positions 1, 2, 4, 5 hold the same page: equal scores
        bank_table[0, j] = page
    scores = block_scores(q, summaries, bank_table, lens, cu)[0]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    selected = memory_select(q, summaries, bank_table, lens, cu, 2)
    for h in range(2):
        assert selected[0, h].tolist() == sorted(order[h, :2].tolist())
        if scores[h, 4] == scores[h].max():
            assert selected[0, h].tolist() == [1, 2]


def test_first_query_of_each_segment_and_query_index(backend):
    q, _, summaries, bank_table, lens, cu = _bank([8, 8], q_lens=[4, 3], seed=6)
    selected = memory_select(q, summaries, bank_table, lens, cu, 3)
    later = q.clone()
    later[1:4] = torch.randn(3, *q.shape[1:])  # tokens after row 0's first: no influence
    assert torch.equal(memory_select(later, summaries, bank_table, lens, cu, 3), selected)
    index = torch.tensor([2, 4], dtype=torch.int32)
    by_index = memory_select(q, summaries, bank_table, lens, cu, 3, query_index=index)
    alone = memory_select(q[[2, 4]], summaries, bank_table, lens, torch.tensor([0, 1, 2], dtype=torch.int32), 3)
    assert torch.equal(by_index, alone)
    none = memory_select(q, summaries, bank_table, lens, cu, 3, query_index=torch.tensor([-1, 4], dtype=torch.int32))
    assert none[0].eq(-1).all() and torch.equal(none[1], by_index[1])


def test_needle_page_is_selected(backend):
    q, k_cache, summaries, bank_table, lens, cu = _bank([20], num_kv_heads=1, num_heads=3, seed=7)
    needle = int(bank_table[0, 13])
    k_cache[needle, 5, 0] = 4 * q[0, 1]  # one key aligned with one query head of the group
    write_summaries(summaries, k_cache, bank_table[0, :20])
    assert 13 in memory_select(q, summaries, bank_table, lens, cu, 1)[0, 0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("summary", ["minmax", "box", "reps", "mean"])
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
def test_selection_matches_the_reference_scores(heads, summary, dtype, backend):
    """Shuffled pages, NaN in the summaries of unused pages and garbage past bank_lens, ragged
    banks (empty, shorter and longer than top_k), an idle row: the backend's selection is a top-k
    of the reference's scores."""
    interpreter_subset(backend, summary)
    bank_lens, top_k = [9, 0, 3, 14, 5], 4
    q, k_cache, _, bank_table, lens, cu = _bank(bank_lens, num_heads=heads[0], num_kv_heads=heads[1],
                                                q_lens=[1, 2, 5, 1, 0], seed=heads[0] + 10, dtype=dtype)
    summaries = torch.full((k_cache.shape[0], heads[1], 2, k_cache.shape[3]), math.nan)
    write_summaries(summaries, k_cache, bank_table[bank_table >= 0], summary=summary)
    bank_table[bank_table < 0] = 10**6  # past bank_lens: never read
    selected = memory_select(q, summaries, bank_table, lens, cu, top_k, summary=summary)
    scores = block_scores(q, summaries, bank_table, lens, cu, summary=summary)
    assert selected.shape == (5, heads[1], top_k) and selected.dtype == torch.int32
    assert selected[4].eq(-1).all() and selected[1].eq(-1).all()  # idle row, empty bank
    assert_same_selection(selected, scores, top_k)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (the interpreter without a GPU)")
@pytest.mark.parametrize("summary", ["minmax", "box", "reps", "mean"])
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
def test_triton_scores_equal_the_reference(heads, summary):
    import importlib

    kernel = importlib.import_module("kvmem.ops.memory_select.triton")
    q, k_cache, summaries, bank_table, lens, cu = _bank([40, 0, 3, 33], num_heads=heads[0], num_kv_heads=heads[1],
                                                        q_lens=[2, 1, 3, 1], seed=heads[0] + 20)
    write_summaries(summaries, k_cache, bank_table[bank_table >= 0], summary=summary)
    index = torch.tensor([1, 2, -1, 6], dtype=torch.int32)
    got = kernel.block_scores(q, summaries, bank_table, lens, index, 0.3, summary)
    want = block_scores(q, summaries, bank_table, lens, cu, scale=0.3, query_index=index, summary=summary)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    torch.testing.assert_close(got, want, atol=SCORE_TOL, rtol=SCORE_TOL)


def test_summaries_write_only_their_pages_and_apply_k_scale():
    _, k_cache, summaries, bank_table, _, _ = _bank([4], seed=8)
    pool = torch.full_like(summaries, math.nan)
    write_summaries(pool, k_cache, bank_table[0, :2].long())
    assert torch.equal(pool[bank_table[0, :2].long()], summaries[bank_table[0, :2].long()])
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[bank_table[0, :2].long()] = False
    assert pool[untouched].isnan().all()
    scale = torch.tensor([0.5, 2.0])
    scaled = compute_summaries(k_cache, bank_table[0, :1], k_scale=scale)
    torch.testing.assert_close(scaled, summaries[bank_table[0, :1].long()] * scale.view(1, 2, 1, 1))
    half = compute_summaries(k_cache.to(torch.bfloat16), bank_table[0, :1])
    assert half.dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), head_dim=st.sampled_from([8, 64, 80]), spread=st.floats(0.01, 100.0))
def test_minmax_score_bounds_every_key(seed, head_dim, spread):
    """Quest's bound: a page's min/max score >= the true max q.k over its keys (fp32 rounding aside)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(2, BLOCK_SIZE, 1, head_dim, generator=g) * spread
    q = torch.randn(1, 1, head_dim, generator=g) * spread
    summaries = compute_summaries(k_cache, torch.tensor([0, 1]))
    bank_table = torch.tensor([[0, 1]], dtype=torch.int32)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    bound = head_scores(q, summaries, bank_table, torch.tensor([2], dtype=torch.int32), cu, scale=1.0)[0, 0]
    true_max = (k_cache[:, :, 0].double() @ q[0, 0].double()).amax(dim=1)
    slack = 1e-5 * (k_cache.double().abs().amax() * q.double().abs().sum())
    assert (bound.double() >= true_max - slack).all()


def test_reps_are_the_two_keys_farthest_from_the_mean():
    """``reps`` summaries hold two real keys of the page: the farthest from its mean first, ties to
    the earlier token; their score is a lower bound of the page's best q.k."""
    g = torch.Generator().manual_seed(11)
    k_cache = torch.randn(3, BLOCK_SIZE, 2, 64, generator=g)
    k_cache[2] = 0.0
    k_cache[2, 3], k_cache[2, 9], k_cache[2, 12], k_cache[2, 14] = 5.0, -5.0, 5.0, -5.0  # mean 0: four tie, 3 then 9
    reps = compute_summaries(k_cache, torch.tensor([0, 1, 2]), summary="reps")
    for page in range(3):
        for h in range(2):
            keys = k_cache[page, :, h]
            dist = (keys - keys.mean(0)).square().sum(-1)
            order = sorted(range(BLOCK_SIZE), key=lambda t: (-float(dist[t]), t))
            assert torch.equal(reps[page, h, 0], keys[order[0]]) and torch.equal(reps[page, h, 1], keys[order[1]])
    assert torch.equal(reps[2, 0], k_cache[2, [3, 9], 0])
    one = compute_summaries(k_cache[:, :1], torch.tensor([0]), summary="reps")  # one-token pages: the key twice
    assert torch.equal(one[0, :, 0], k_cache[0, 0]) and torch.equal(one[0, :, 1], k_cache[0, 0])
    q = torch.randn(1, 2, 64, generator=g)
    got = head_scores(q, reps, torch.tensor([[0, 1, 2]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                      torch.tensor([0, 1], dtype=torch.int32), scale=1.0, summary="reps")[0]
    true_max = torch.einsum("hd,nthd->hnt", q[0], k_cache).amax(-1)
    assert (got <= true_max + 1e-4).all()


def test_group_rule_a_flat_head_never_outvotes_a_peaked_one(backend):
    """GQA 2: head 0 scores every page alike with large logits, head 1 points at one page with
    small ones: the group rule (max of per-head log-probabilities) selects head 1's page, where the
    plain max of the scores would pick by head 0's noise."""
    g = torch.Generator().manual_seed(12)
    n, D = 12, 64
    summaries = torch.full((n + 2, 1, 2, D), math.nan)
    base = torch.randn(n, D, generator=g) * 0.01
    summaries[:n, 0, 0] = base
    summaries[:n, 0, 1] = base
    q = torch.zeros(1, 2, D)
    q[0, 0, 0] = 40.0  # head 0: large, nearly flat logits (channel 0 of every page ~ 1 + noise)
    summaries[:n, 0, :, 0] = 1.0 + 0.02 * torch.arange(n, dtype=torch.float32).flip(0)[:, None]  # head 0 prefers page 0
    q[0, 1, 1] = 3.0  # head 1: small logits, one page stands out
    summaries[7, 0, :, 1] = 4.0
    bank_table = torch.arange(n, dtype=torch.int32)[None]
    lens, cu = torch.tensor([n], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    for summary in ("minmax", "box", "reps", "mean"):
        if summary == "box":
            summaries[:n, 0, 1] = 0.0  # box: [centre, radius]
            summaries[7, 0, 0, 1] = 4.0
        selected = memory_select(q, summaries, bank_table, lens, cu, 1, summary=summary)
        assert selected[0, 0].tolist() == [7], summary
        raw = head_scores(q, summaries, bank_table, lens, cu, summary=summary)[0]
        assert int(raw.amax(0).argmax()) != 7  # the plain max would not
    single = memory_select(q[:, 1:], summaries, bank_table, lens, cu, 3)  # one head per KV head: plain order
    order = torch.sort(head_scores(q[:, 1:], summaries, bank_table, lens, cu)[0, 0], descending=True, stable=True)
    assert single[0, 0].tolist() == sorted(order.indices[:3].tolist())


def _bad(match, *args, **kw):
    with pytest.raises((ValueError, TypeError), match=match):
        memory_select(*args, **kw)


def test_bad_input_is_named():
    q, k_cache, summaries, bank_table, lens, cu = _bank([3, 2], seed=9)
    _bad("'top_k'", q, summaries, bank_table, lens, cu, -1)
    _bad("'top_k'", q, summaries, bank_table, lens, cu, 2.0)
    _bad("'summary'", q, summaries, bank_table, lens, cu, 2, summary="median")
    _bad("'summaries'.*shape", q, summaries[:, :, :1], bank_table, lens, cu, 2)
    _bad("'q'.*divisible", q[:, :3], summaries, bank_table, lens, cu, 2)
    _bad("'bank_lens'.*max_bank", q, summaries, bank_table, lens + 5, cu, 2)
    _bad("'bank_lens'", q, summaries, bank_table, lens.long(), cu, 2)
    broken = bank_table.clone()
    broken[0, 1] = -1
    _bad("'bank_table'.*page ids", q, summaries, broken, lens, cu, 2)
    _bad("'query_index'", q, summaries, bank_table, lens, cu, 2, query_index=torch.tensor([0, 9], dtype=torch.int32))
    _bad("'cu_seqlens_q'", q, summaries, bank_table, lens, cu[:2], 2)
    with pytest.raises(ValueError, match="'page_ids'"):
        compute_summaries(k_cache, torch.tensor([k_cache.shape[0]]))
    with pytest.raises(ValueError, match="'summaries'.*one row per page"):
        write_summaries(summaries[:3], k_cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="'summary'"):
        write_summaries(summaries, k_cache, torch.tensor([0]), summary="median")


def _random_pool(bank_lens, *, num_heads, num_kv_heads, head_dim, seed, q_dtype=torch.float32,
                 summary_dtype=torch.float32, pool_extra=7):
    """Summaries drawn directly (no pages), a shuffled pool with NaN in unused pages, garbage in
    the bank tables past bank_lens."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(bank_lens) + pool_extra
    summaries = torch.full((num_blocks, num_kv_heads, 2, head_dim), math.nan)
    perm = torch.randperm(num_blocks, generator=g)
    bank_table = torch.full((len(bank_lens), max(bank_lens) + 3), 10**6, dtype=torch.int32)
    start = 0
    for b, n in enumerate(bank_lens):
        pages = perm[start:start + n]
        start += n
        bank_table[b, :n] = pages.to(torch.int32)
        low = torch.randn(n, num_kv_heads, head_dim, generator=g)
        summaries[pages] = torch.stack([low, low + torch.rand(n, num_kv_heads, head_dim, generator=g)], dim=2)
    summaries = summaries.to(summary_dtype)
    q = torch.randn(len(bank_lens), num_heads, head_dim, generator=g).to(q_dtype)
    cu = torch.arange(len(bank_lens) + 1, dtype=torch.int32)
    return q, summaries, bank_table, torch.tensor(bank_lens, dtype=torch.int32), cu


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=lambda d: f"q_{str(d[0])[6:]}-s_{str(d[1])[6:]}")
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("summary", ["minmax", "box", "reps", "mean"])
def test_dtypes_and_head_dims(dtypes, head_dim, summary, backend):
    """q and summaries in fp32 / bf16 / fp16 (summaries fp32 or the cache's dtype), the core's
    head dims, GQA 3: a top-k of the reference's scores."""
    interpreter_subset(backend, summary)
    q, summaries, bank_table, lens, cu = _random_pool([37, 0, 5, 70], num_heads=6, num_kv_heads=2,
                                                      head_dim=head_dim, seed=head_dim, q_dtype=dtypes[0],
                                                      summary_dtype=dtypes[1])
    selected = memory_select(q, summaries, bank_table, lens, cu, 8, summary=summary)
    scores = block_scores(q, summaries, bank_table, lens, cu, summary=summary)
    assert selected[1].eq(-1).all() and (selected[2, :, 5:] == -1).all()
    assert_same_selection(selected, scores, 8)


@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
def test_long_banks(heads, backend):
    """One long row (its bank scored in tiles across threads) and a ragged batch of long rows."""
    for bank_lens, top_k in (([5000], 205), ([1500, 700, 2100], 64)):
        q, summaries, bank_table, lens, cu = _random_pool(bank_lens, num_heads=heads[0], num_kv_heads=heads[1],
                                                          head_dim=64, seed=sum(bank_lens) + heads[0])
        selected = memory_select(q, summaries, bank_table, lens, cu, top_k)
        assert_same_selection(selected, block_scores(q, summaries, bank_table, lens, cu), top_k)


def test_ties_across_a_long_bank(backend):
    """Four pages, each at 50 positions: the best page's 50 positions, then the lowest 10
    positions of the second best (stable order on (-score, position)), ascending."""
    q, summaries, _, _, cu = _random_pool([4], num_heads=4, num_kv_heads=2, head_dim=64, seed=3)
    pages = torch.tensor([0, 1, 2, 3]).repeat(50)[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    bank_table = torch.full((1, 200), 0, dtype=torch.int32)
    page_ids = torch.nonzero(~summaries[:, 0, 0, 0].isnan()).flatten()
    bank_table[0] = page_ids[pages].to(torch.int32)
    lens = torch.tensor([200], dtype=torch.int32)
    selected = memory_select(q, summaries, bank_table, lens, cu, 60)
    scores = block_scores(q, summaries, bank_table, lens, cu)[0]
    for h in range(2):
        levels = sorted({float(s) for s in scores[h]}, reverse=True)
        assert len(levels) == 4 and levels[0] - levels[1] > 1e-3 and levels[1] - levels[2] > 1e-3
        best = [j for j in range(200) if float(scores[h, j]) == levels[0]]
        second = [j for j in range(200) if float(scores[h, j]) == levels[1]][:10]
        assert selected[0, h].tolist() == sorted(best + second)
