"""Memory policies (kvmem.memory.policies): the built-ins equal their reference formulations, a
user policy runs through generate(), StreamingLLM is top_k=0, HeavyHitters keeps its budget, and a
bad policy is a named PolicyError before any attention kernel runs, the model usable afterwards."""

import math

import pytest
import torch

import kvmem
from kvmem.memory import (BoxScore, EvictionPolicy, HeavyHitters, InfLLMReps, MeanKey, PolicyError, QuestMinMax,
                          SelectionPolicy, StreamingLLM, policies)
from kvmem.ops.memory_select import reference as select_reference

SCORE_TOL = 1e-5


def assert_same_selection(got, scores, top_k, tol=SCORE_TOL):
    """A valid top-k of ``scores`` (sets; blocks within ``tol`` of the k-th score may go either way)."""
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            row = scores[b, h].double()
            live = int(torch.isfinite(row).sum())
            chosen = [int(i) for i in got[b, h] if i >= 0]
            assert chosen == sorted(set(chosen)) and len(chosen) == min(top_k, live), (b, h, chosen)
            assert got[b, h, len(chosen):].eq(-1).all()
            if chosen:
                kth = float(torch.sort(row, descending=True, stable=True).values[len(chosen) - 1])
                band = tol * max(1.0, abs(kth))
                assert {j for j in range(row.shape[0]) if row[j] > kth + band} <= set(chosen), (b, h, chosen)
                assert all(row[j] >= kth - band for j in chosen), (b, h, chosen)


def _case(group, summary, seed, *, hkv=2, d=32, bs=8):
    """Random full pages in a shuffled pool; unused pages and unused summary rows NaN; padding of
    ``bank_table`` past ``bank_lens`` points at NaN pages; rows without a query and an empty bank."""
    g = torch.Generator().manual_seed(seed)
    bank_lens = [9, 4, 1, 0, 6]
    pages = sum(bank_lens) + 6
    k_cache = torch.full((pages, bs, hkv, d), math.nan)
    perm = torch.randperm(pages, generator=g).tolist()
    width = max(bank_lens) + 2
    table = torch.full((len(bank_lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(bank_lens):
        for j in range(n):
            p = perm.pop()
            k_cache[p] = torch.randn(bs, hkv, d, generator=g) * 2 + 0.5
            table[b, j] = p
    table[0, 9] = perm[0]  # padding past bank_lens: a NaN page
    summaries = torch.full((pages + 1, hkv, 2, d), math.nan)
    select_reference.write_summaries(summaries, k_cache, table[table >= 0].long(), summary=summary)
    summaries[int(perm[0])] = math.nan
    q = torch.randn(11, hkv * group, d, generator=g)
    cu = torch.tensor([0, 3, 4, 6, 6, 11], dtype=torch.int32)
    query_index = torch.tensor([1, 3, -1, -1, 7], dtype=torch.int32)
    return q, summaries, table, torch.tensor(bank_lens, dtype=torch.int32), cu, query_index


@pytest.mark.parametrize("policy", [MeanKey(), QuestMinMax(), InfLLMReps(), BoxScore()], ids=lambda p: p.name)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_selection_builtins_equal_memory_select_reference(policy, group):
    q, summaries, table, lens, cu, qidx = _case(group, policy.summary, seed=group)
    scale = 0.3
    for top_k in (0, 3, 12):
        got = policy.select(q, summaries, table, lens, qidx, top_k, scale=scale)
        want_scores = select_reference.block_scores(q, summaries, table, lens, cu, scale=scale, query_index=qidx,
                                                    summary=policy.summary)
        assert got.dtype == torch.int32 and got.shape == (5, 2, top_k)
        assert_same_selection(got, want_scores, top_k)
        # the built-in output passes the user-policy check unchanged (already canonical)
        assert torch.equal(policies.validate_selected(policy, got, lens, qidx, top_k, 2), got)


def test_streaming_llm_is_top_k_zero():
    cfg = kvmem.MemoryConfig(selection="streaming")
    assert isinstance(cfg.selection, StreamingLLM) and cfg.selection == StreamingLLM()
    model = type("C", (), {"max_position_embeddings": 1024, "rope_theta": 1e4, "num_hidden_layers": 2})()
    assert cfg.resolve(model, 16).top_k == 0
    with pytest.raises(ValueError, match="'top_k'.*0 or None with selection=StreamingLLM"):
        kvmem.MemoryConfig(selection=StreamingLLM(), top_k=3)
    out = StreamingLLM().select(torch.randn(2, 4, 8), torch.randn(5, 2, 2, 8), torch.zeros(2, 3, dtype=torch.int32),
                                torch.tensor([3, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 0,
                                scale=1.0)
    assert out.shape == (2, 2, 0)


def test_config_policies_compare_hash_and_name_errors():
    a, b = kvmem.MemoryConfig(selection="quest", eviction=HeavyHitters(4)), kvmem.MemoryConfig(selection=QuestMinMax(),
                                                                                                  eviction=HeavyHitters(4))
    assert a == b and hash(a) == hash(b) and a.summary == "minmax" and a.needs_mass
    assert kvmem.MemoryConfig().selection == MeanKey() and not kvmem.MemoryConfig().needs_mass
    assert kvmem.MemoryConfig(summary="box").selection == BoxScore()
    with pytest.raises(ValueError, match="'summary'.*'reps'"):
        kvmem.MemoryConfig(summary="minmax", selection=InfLLMReps())
    with pytest.raises(ValueError, match="'selection'.*one of"):
        kvmem.MemoryConfig(selection="h2o")
    with pytest.raises(TypeError, match="'eviction'"):
        kvmem.MemoryConfig(eviction="h2o")

    class Unhashable(SelectionPolicy):
        summary = "mean"
        __hash__ = None

    with pytest.raises(TypeError, match="'selection' must be hashable"):
        kvmem.MemoryConfig(selection=Unhashable())
    with pytest.raises(ValueError, match="'budget_blocks'"):
        HeavyHitters(-1)


# ------------------------------------------------------------------------------ HeavyHitters
def _heavy_hitters_reference(table, lens, mass, budget):
    keep = []
    for b, n in enumerate(lens):
        order = sorted(range(n), key=lambda j: (-mass[b][j], j))[:budget]
        keep.append([j in order and j < n for j in range(len(table[b]))])
    return keep


@pytest.mark.parametrize("budget", [0, 2, 5, 20])
def test_heavy_hitters_equals_the_plain_python_formulation(budget):
    g = torch.Generator().manual_seed(budget)
    lens = torch.tensor([7, 3, 0, 12], dtype=torch.int32)
    table = torch.randperm(60, generator=g)[:4 * 12].view(4, 12).to(torch.int32)
    mass = torch.randint(0, 4, (4, 12), generator=g).float()  # integer masses: ties on purpose
    mass[1, :] = 1.0  # all tied: the lower positions stay
    mass[:3, 10:] = float("nan")  # past bank_lens of rows 0..2: ignored
    keep = HeavyHitters(budget).evict(table, lens, mass)
    assert keep.dtype == torch.bool and keep.shape == table.shape
    assert keep.tolist() == _heavy_hitters_reference(table.tolist(), lens.tolist(), mass.nan_to_num(-1).tolist(),
                                                     budget)
    assert keep.sum(1).tolist() == [min(budget, n) for n in lens.tolist()]


def _cache_bank(cfg):
    from kvmem.integrations.hf.memory import BankSpec, CacheBank

    return CacheBank(BankSpec(cfg, frozenset({0})), num_kv_heads=2, head_dim=8)


def test_cache_bank_applies_the_eviction_policy_between_steps_and_rolls_it_back():
    """Two rows bank 7 and 5 blocks in a prefill; before the next step HeavyHitters(3) keeps the 3
    of each with the most page mass; a step that fails restores them."""
    pytest.importorskip("transformers")
    cfg = kvmem.MemoryConfig(mode="exact", sink_tokens=4, window=8, block_size=4, top_k=2, chunk_size=8,
                             eviction=HeavyHitters(3))
    bank = _cache_bank(cfg)
    tables = [list(range(0, 20)), list(range(20, 40))]
    bank.plan(tables, [0, 0], [44, 36], "cpu")
    before = [list(p) for p in bank.banks.pages]
    assert [len(p) for p in before] == [7, 5]
    g = torch.Generator().manual_seed(0)
    bank.page_mass = torch.rand(41, generator=g)
    bank.finish(type("S", (), {"memory": None, "q_len": 1})())
    mass_before = bank.page_mass.clone()
    bank.plan(tables, [44, 36], [1, 1], "cpu")
    mass = bank.page_mass.tolist()
    for row, pages in enumerate(before):
        want = sorted(sorted(range(len(pages)), key=lambda j: (-mass[pages[j]], j))[:3])
        assert bank.banks.pages[row][:3] == [pages[j] for j in want]
    # a step that fails after some layers added attention mass: the rollback drops that mass too
    bank.page_mass += 1.0
    bank.rollback()
    assert bank.banks.pages == before
    assert torch.equal(bank.page_mass, mass_before)


def test_row_banks_retain_drops_for_good_and_checks_every_row_first():
    from kvmem.memory import RowBanks

    banks = RowBanks(sink_blocks=1, window=8, block_size=4, batch=2)
    banks.evict(0, list(range(10, 20)), 24)  # blocks 1..3 leave the window
    assert banks.pages == [[11, 12, 13], []]
    assert banks.retain([[2, 0], []]) == [[12], []] and banks.pages == [[11, 13], []]
    with pytest.raises(ValueError, match="'keep' of row 1 must hold positions in \\[0, 0\\)"):
        banks.retain([[0], [3]])
    assert banks.pages == [[11, 13], []]
    assert banks.evict(0, list(range(10, 20)), 28) == [14]  # the dropped block 2 never returns
    assert banks.pages == [[11, 13, 14], []]


def test_validate_selected_names_the_policy_and_the_problem():
    class Mine(SelectionPolicy):
        summary = "mean"

    lens, qidx = torch.tensor([3, 1, 2], dtype=torch.int32), torch.tensor([0, 1, -1], dtype=torch.int32)
    good = torch.tensor([[[2, 0], [1, 2]], [[0, -1], [-1, 0]], [[-1, -1], [-1, -1]]], dtype=torch.int32)
    assert policies.validate_selected(Mine(), good, lens, qidx, 2, 2).tolist() == \
        [[[0, 2], [1, 2]], [[0, -1], [0, -1]], [[-1, -1], [-1, -1]]]  # sorted, -1 last
    bad = [(good.clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(0)), torch.tensor(3, dtype=torch.int32)),
            "Mine: select returned a position >= bank_lens"),
           (good.clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(0)), torch.tensor(0, dtype=torch.int32)),
            "Mine: select returned duplicate positions"),
           (good.clone().index_put_((torch.tensor(1), torch.tensor(0), torch.tensor(1)), torch.tensor(-2, dtype=torch.int32)),
            "Mine: select returned positions < -1"),
           (good.clone().index_put_((torch.tensor(2), torch.tensor(0), torch.tensor(0)), torch.tensor(1, dtype=torch.int32)),
            "Mine: select must fill min\\(top_k, bank_lens\\) = 0"),
           (good.long(), "Mine: select must return int32"),
           (good[:, :1], "Mine: select must return shape"),
           ([[0]], "Mine: select must return a torch.Tensor")]
    for selected, match in bad:
        with pytest.raises(PolicyError, match=match):
            policies.validate_selected(Mine(), selected, lens, qidx, 2, 2)
    with pytest.raises(PolicyError, match="Bad: evict must return a bool"):
        policies.validate_keep(type("Bad", (EvictionPolicy,), {})(), torch.ones(3, 4), torch.zeros(3, 4))


@pytest.mark.parametrize("rot", [None, 32])
@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1, 1], [100, 37, 70]), ([16, 9, 1], [120, 60, 90])])
def test_block_mass_on_the_paged_kernels_equals_the_reference(rot, q_lens, kv_lens):
    """The seam's attend with block_mass (paged kernels + paged.selected_block_mass from their lse)
    equals memory_attention's reference out and block_mass: random pruning selection, GQA 3,
    softcap, sink logits, RoPE on load or per-head k/v scales."""
    from memory_cases import make_memory_case

    from kvmem.memory import kernels
    from kvmem.ops.memory_attention import reference

    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=2, rope_rot_dim=rot, softcap=8.0,
                            sink_logits=True, kv_scale=rot is None, seed=4)
    kw = case.kwargs
    want_mass = torch.full((len(q_lens), 2, case.bank_table.shape[1]), math.nan)
    want, want_lse = reference.memory_attention(*case.args(), **case.memory_kwargs(), block_mass=want_mass)
    mass = torch.full_like(want_mass, math.nan)
    lse = torch.full((sum(q_lens), 6), math.nan)  # the caller's lse is written beside block_mass
    got = kernels.attend(*case.args(), sink_blocks=case.sink_blocks, window_start=case.window_start,
                         bank_table=case.bank_table, selected=case.selected, scale=1 / math.sqrt(64),
                         softcap=kw["softcap"], sink_logits=kw["sink_logits"], rope_cos_sin=kw.get("rope_cos_sin"),
                         k_scale=kw.get("k_scale"), v_scale=kw.get("v_scale"), block_mass=mass, lse=lse)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mass, want_mass, atol=2e-5, rtol=2e-5)
    assert (mass > 0).sum() == (case.selected >= 0).sum()  # every selected block got mass, nothing else


def test_nn_memory_attention_takes_the_policies_of_its_config():
    """kvmem.nn.MemoryAttention runs the config's selection policy (a user policy equals the
    built-in) and wants a page_mass pool exactly when a policy reads attention mass."""
    import dataclasses

    from test_memory_nn import _setup, _step

    cfg, mgr, pools, attn, banks, summaries, _ = _setup("exact")
    for s in "ab":
        mgr.add_sequence(s)
    md, ms = _step(mgr, banks, cfg, [30, 13])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(43, h, 16, generator=g) for h in (6, 2, 2))
    want = attn(q, k, v, *pools[0], md, ms, summaries.clone())
    attn.config = dataclasses.replace(cfg, selection=UserMeanKey())
    torch.testing.assert_close(attn(q, k, v, *pools[0], md, ms, summaries.clone()), want, atol=1e-6, rtol=0)
    attn.config = dataclasses.replace(cfg, eviction=HeavyHitters(1))
    with pytest.raises(ValueError, match="'page_mass' must be a \\[num_blocks \\+ 1\\] fp32 tensor"):
        attn(q, k, v, *pools[0], md, ms, summaries.clone())
    mass = attn.mass_pool(48)
    torch.testing.assert_close(attn(q, k, v, *pools[0], md, ms, summaries.clone(), page_mass=mass), want,
                               atol=1e-5, rtol=1e-5)
    assert mass[:-1].sum() > 0 and set(mass[:-1].nonzero().flatten().tolist()) <= set(banks.pages[0] + banks.pages[1])


# ------------------------------------------------------------------------------ through generate()
transformers = pytest.importorskip("transformers")
from test_hf_memory import gen, prompt, tiny_llama  # noqa: E402

from kvmem.integrations import patch, unpatch  # noqa: E402
from kvmem.integrations.hf.compat import output_cache  # noqa: E402

SIZES = dict(sink_tokens=16, window=32, block_size=16, top_k=2, chunk_size=24)


class UserMeanKey(SelectionPolicy):
    """The default rule re-written by a user in plain torch: mean-key scores, the group rule, top-k."""

    summary = "mean"

    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, *, scale, mass=None):
        n, hkv = bank_table.shape[0], summaries.shape[1]
        qs = q[query_index.long().clamp(min=0)].float().view(n, hkv, -1, q.shape[-1])  # [n, Hkv, G, D]
        keys = summaries[bank_table.long().clamp(min=0), :, 0].permute(0, 2, 1, 3)  # [n, Hkv, W, D]
        s = torch.einsum("nhgd,nhwd->nhgw", qs, keys) * scale
        live = (torch.arange(bank_table.shape[1]) < bank_lens[:, None]) & (query_index[:, None] >= 0)
        s = s.masked_fill(~live[:, None, None], -math.inf)
        s = (s - torch.logsumexp(s, -1, keepdim=True).nan_to_num(neginf=0.0)).amax(2)  # the group rule
        return policies.top_k_positions(s, top_k)


class TrustedShuffled(UserMeanKey):
    """A trusted policy (no checks) returning its positions in another order, padding first: "any
    order" holds for it too."""

    validate = False

    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, **kw):
        return super().select(q, summaries, bank_table, bank_lens, query_index, top_k, **kw).flip(-1).contiguous()


def _generate(m, cfg, **g):
    patch(m, memory_bank=cfg)
    try:
        out = gen(m, **g)
        return out, output_cache(out)._bank
    finally:
        unpatch(m)


@pytest.mark.parametrize("mode", ["exact", "extend"])
def test_user_policy_equals_the_built_in_through_generate(mode):
    m = tiny_llama(seed=11)
    g = dict(input_ids=prompt(150, seed=12), max_new_tokens=10)
    ref, _ = _generate(m, kvmem.MemoryConfig(mode=mode, **SIZES), **g)
    out, bank = _generate(m, kvmem.MemoryConfig(mode=mode, selection=UserMeanKey(), **SIZES), **g)
    assert torch.equal(out.sequences, ref.sequences)
    assert max(bank.banks.bank_lens().tolist()) > SIZES["top_k"]  # the selection prunes
    shuffled, _ = _generate(m, kvmem.MemoryConfig(mode=mode, selection=TrustedShuffled(), **SIZES), **g)
    assert torch.equal(shuffled.sequences, ref.sequences)
    for a, b in zip(shuffled.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_streaming_llm_policy_equals_top_k_zero_through_generate():
    m = tiny_llama(seed=13)
    g = dict(input_ids=prompt(120, seed=14), max_new_tokens=8)
    sizes = {**SIZES, "top_k": 0}
    ref, _ = _generate(m, kvmem.MemoryConfig(mode="extend", **sizes), **g)
    out, _ = _generate(m, kvmem.MemoryConfig(mode="extend", **{**sizes, "top_k": None}, selection="streaming"), **g)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_heavy_hitters_through_generate():
    """Collecting block_mass does not change attention (a budget never reached = no eviction);
    HeavyHitters(2) bounds every bank to its budget + the blocks banked by the last step."""
    m = tiny_llama(seed=15)
    g = dict(input_ids=prompt(150, seed=16), max_new_tokens=20)
    ref, _ = _generate(m, kvmem.MemoryConfig(mode="exact", **SIZES), **g)
    out, bank = _generate(m, kvmem.MemoryConfig(mode="exact", eviction=HeavyHitters(1000), **SIZES), **g)
    assert torch.equal(out.sequences, ref.sequences)
    assert float(bank.page_mass[:-1].sum()) > 0  # mass was collected
    out, bank = _generate(m, kvmem.MemoryConfig(mode="exact", eviction=HeavyHitters(2), **SIZES), **g)
    assert out.sequences.shape == ref.sequences.shape
    # the last eviction ran before the last step (L = 168, w0 = 8): block 7 was banked at L = 160
    assert bank.banks.bank_lens().tolist() == [2]
    assert bank.banks.banked_until[0] == (150 + 19 - 32) // 16  # every block that left the window was banked


class OutOfRange(UserMeanKey):
    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, **kw):
        s = super().select(q, summaries, bank_table, bank_lens, query_index, top_k, **kw)
        return torch.where(s >= 0, s + bank_lens[:, None, None], s)


class Duplicate(UserMeanKey):
    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, **kw):
        s = super().select(q, summaries, bank_table, bank_lens, query_index, top_k, **kw)
        return torch.where(s >= 0, s[..., :1].expand_as(s), s).contiguous()


class WrongShape(UserMeanKey):
    def select(self, *args, **kw):
        return super().select(*args, **kw)[:, :1]


class BadKeep(EvictionPolicy):
    def evict(self, bank_table, bank_lens, mass):
        return torch.ones(bank_table.shape[0], bank_table.shape[1] + 1, dtype=torch.bool)


def test_bad_policies_are_named_errors_and_the_model_stays_usable():
    m = tiny_llama(seed=17)
    g = dict(input_ids=prompt(100, seed=18), max_new_tokens=6)
    plain = gen(m, **g)
    good = kvmem.MemoryConfig(mode="exact", **SIZES)
    ref, _ = _generate(m, good, **g)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for cfg, match in ((kvmem.MemoryConfig(mode="exact", selection=OutOfRange(), **SIZES), "OutOfRange.*>= bank_lens"),
                       (kvmem.MemoryConfig(mode="exact", selection=Duplicate(), **SIZES), "Duplicate.*duplicate"),
                       (kvmem.MemoryConfig(mode="exact", selection=WrongShape(), **SIZES), "WrongShape.*shape"),
                       (kvmem.MemoryConfig(mode="exact", eviction=BadKeep(), **SIZES), "BadKeep.*shape")):
        with pytest.raises(PolicyError, match=match):
            _generate(m, cfg, **g)
        out, _ = _generate(m, good, **g)
        assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert torch.equal(gen(m, **g).sequences, plain.sequences)
