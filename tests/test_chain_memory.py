"""Memory for model chains (issue 14 items 1-4): answers reused next turn, namespaced block hashes, LRU
eviction under a user budget, a batch's shared prefix stored once. Every reuse is checked against
the same model without reuse: identical greedy tokens, logits within 1e-4."""


import pytest
import torch

import kvmem
from smollm2 import smollm2_files  # noqa: E402
from kvmem.cache import KVCacheManager, KVPool, LayerGroupSpec

transformers = pytest.importorskip("transformers")

from kvmem.integrations.hf.compat import cache_kwarg, output_cache  # noqa: E402
from kvmem.integrations.hf.fingerprint import model_fingerprint  # noqa: E402

TOL = 1e-4
CACHE_KW = cache_kwarg(transformers.LlamaForCausalLM)  # "cache" from transformers 5.24, "past_key_values" before


def tiny(seed=0, **kw):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0,
               eos_token_id=None, bos_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def pair(seed=0):
    """A prefix-caching model and the same weights unpatched (the reference: no reuse)."""
    ref = tiny(seed)
    m = tiny(seed)
    m.load_state_dict(ref.state_dict())
    return m, ref


def gen(model, ids, mask=None, **kw):
    kw = {"max_new_tokens": 6, "do_sample": False, **kw}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True,
                              **kw)


def same(out, ref):
    assert torch.equal(out.sequences, ref.sequences), "generated tokens differ"
    err = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert err <= TOL, f"logits differ by {err:.2e}"


def toks(n, seed, vocab=128):
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_repeated_prompt_and_divergence_mid_block_and_at_a_boundary():
    m, ref = pair()
    base = toks(40, 1)
    prompts = [base, base, torch.cat([base[:22], toks(9, 2)]),  # repeated; diverges inside block 5 (bs 4)
               torch.cat([base[:24], toks(9, 3)])]  # diverges at a block boundary
    kvmem.patch(m, prefix_cache=True, block_size=4)
    try:
        reused = []
        for p in prompts:
            same(gen(m, p[None]), gen(ref, p[None]))
            reused.append(m._kvmem_prefix_report.reused_tokens)
    finally:
        kvmem.unpatch(m)
    # 2nd: the prompt's 10 blocks minus the last token's; then answers extend nothing shared; the
    # divergent prompts reuse the full blocks before the divergence (20 and 24 tokens)
    assert reused == [0, 36, 20, 24]


def test_batch_of_four_stores_a_2k_prefix_once():
    m, ref = pair()
    prefix = toks(2048, 4)
    rows = [torch.cat([prefix, toks(5 + r, 10 + r)]) for r in range(4)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    for r, row in enumerate(rows):  # left padding
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    kvmem.patch(m, prefix_cache=True, block_size=16, num_blocks=4 * 131 + 200)
    try:
        out = gen(m, ids, mask, max_new_tokens=4)
        cache = output_cache(out)
        tables = [cache.manager.block_table(s, "full") for s in cache._seq_ids]
        used = cache.manager.allocator("full").num_used
        report = m._kvmem_prefix_report
    finally:
        kvmem.unpatch(m)
    same(out, gen(ref, ids, mask, max_new_tokens=4))
    # the one-row pre-pass computed the 2048 shared tokens once; the rows (left pads 3, 2, 1, 0) start
    # at column 2048, so row r keeps 2048 - pad_r of them: the padded rows recompute their last 1-3
    # prefix tokens into a copy-on-write copy of block 128
    pads = [width - len(r) for r in rows]
    assert pads == [3, 2, 1, 0]
    assert report.prepass_tokens == 2048 and report.reused_per_row == [2048 - p for p in pads]
    assert all(t[:127] == tables[0][:127] for t in tables)  # the same pages start every block table
    assert len({t[127] for t in tables}) == 4  # block 128: row 3 holds the pre-pass's, rows 0-2 their copies
    assert report.shared_blocks == 127
    kv = [len(r) + 3 for r in rows]  # tokens each row holds (the last generated token is never fed)
    # the prefix once (127 shared blocks + the original block 128, row 3's), not 4 times
    assert used == 128 + sum(-(-k // 16) - 127 for k in kv[:3]) + (-(-kv[3] // 16) - 128)


def test_batch_sharing_a_prefix_computes_it_once():
    """Rows with one prefix and their own suffixes (equal lengths: no padding): a one-row pre-pass
    computes the prefix, the batch prefill only the suffixes (tokens fed to the model counted)."""
    m, ref = pair()
    prefix = toks(300, 7)
    ids = torch.stack([torch.cat([prefix, toks(9, 30 + r)]) for r in range(3)])
    fed = []
    hook = m.model.register_forward_pre_hook(lambda mod, a, kw: fed.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    kvmem.patch(m, prefix_cache=True, block_size=16)
    try:
        out = gen(m, ids, max_new_tokens=5)
        report = m._kvmem_prefix_report
        cache = output_cache(out)
        tables = [cache.manager.block_table(s, "full") for s in cache._seq_ids]
        again = gen(m, ids, max_new_tokens=5)  # everything cached now: no pre-pass
        report2 = m._kvmem_prefix_report
    finally:
        kvmem.unpatch(m)
        hook.remove()
    want = gen(ref, ids, max_new_tokens=5)
    same(out, want)
    same(again, want)
    assert fed[0] == (1, 288) and fed[1] == (3, 309 - 288)  # 18 blocks once, then 21 columns per row
    assert report.prepass_tokens == 288 and report.reused_per_row == [288] * 3
    assert all(t[:18] == tables[0][:18] for t in tables) and report.shared_blocks == 18
    assert report2.prepass_tokens == 0 and report2.reused_per_row == [304] * 3  # + each row's own 19th block
    kvmem.patch(m, prefix_cache=True, block_size=16)
    try:  # a row that shares nothing: no pre-pass (generate() feeds every row the same columns)
        odd = ids.clone()
        odd[2] = toks(309, 40)
        gen(m, odd, max_new_tokens=2)
        assert m._kvmem_prefix_report.prepass_tokens == 0
    finally:
        kvmem.unpatch(m)


def left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    return ids, mask


def test_prepass_respects_the_budget_and_an_interrupted_prepass_leaves_nothing_reused():
    """Unequal left padding: the pre-pass would cost a copy-on-write block per more-padded row,
    so under a budget that fits only the call without it, it is skipped (the call still runs);
    one block more and it runs. A pre-pass interrupted half-way (a layer raises) is rolled back:
    the next identical call reuses nothing unwritten and matches the reference."""
    m, ref = pair()
    prefix = toks(64, 4)
    ids, mask = left_padded([torch.cat([prefix, toks(5 + r, 10 + r)]) for r in range(2)])  # pads [1, 0]
    want = gen(ref, ids, mask, max_new_tokens=2)
    for budget, prepass in ((6, 0), (7, 64)):
        kvmem.patch(m, prefix_cache=True, block_size=16, num_blocks=budget)
        try:
            same(gen(m, ids, mask, max_new_tokens=2), want)
            assert m._kvmem_prefix_report.prepass_tokens == prepass, budget
        finally:
            kvmem.unpatch(m)
    ids = torch.stack([torch.cat([prefix, toks(6, 20 + r)]) for r in range(2)])
    want = gen(ref, ids, max_new_tokens=3)
    layer = m.model.layers[1]
    orig, armed = layer.forward, [True]

    def interrupted(*a, **k):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt("simulated")
        return orig(*a, **k)

    kvmem.patch(m, prefix_cache=True, block_size=16)
    layer.forward = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            gen(m, ids, max_new_tokens=3)  # the first forward is the pre-pass's
        assert m._kvmem_options.pool.live is None
        same(gen(m, ids, max_new_tokens=3), want)
        assert m._kvmem_prefix_report.prepass_tokens == 64  # computed anew, not reused half-written
    finally:
        layer.forward = orig
        kvmem.unpatch(m)


def test_prepass_with_a_sliding_window_group_only_for_equal_padding():
    """A sliding-window layer group drops the prefix's early blocks, so a more padded row could not
    start inside the prefix: with unequal padding no pre-pass; with equal padding it runs and the
    batch is fed only the suffix columns. Outputs equal unpatched HF either way."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   pad_token_id=0, use_sliding_window=True, sliding_window=32, max_window_layers=1,
                                   layer_types=["full_attention", "sliding_attention"])
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    m.load_state_dict(ref.state_dict())
    prefix = toks(96, 4)
    for suffixes, prepass, first in (([6, 6], 96, (1, 96)), ([3, 6, 8], 0, (3, 104))):
        ids, mask = left_padded([torch.cat([prefix, toks(n, 10 + r)]) for r, n in enumerate(suffixes)])
        fed = []
        hook = m.model.register_forward_pre_hook(lambda mod, a, kw: fed.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
        kvmem.patch(m, prefix_cache=True, block_size=16)
        try:
            out = gen(m, ids, mask, max_new_tokens=3)
            assert m._kvmem_prefix_report.prepass_tokens == prepass and fed[0] == first
        finally:
            kvmem.unpatch(m)
            hook.remove()
        same(out, gen(ref, ids, mask, max_new_tokens=3))


def test_beams_and_num_return_sequences():
    m, ref = pair()
    p = toks(30, 5)[None]
    kvmem.patch(m, prefix_cache=True, block_size=4)
    try:
        for _ in range(2):  # the second call of each starts from the cached prompt blocks
            same(gen(m, p, num_beams=3, num_return_sequences=2), gen(ref, p, num_beams=3, num_return_sequences=2))
        assert m._kvmem_prefix_report.reused_tokens == 3 * 28 and m._kvmem_prefix_report.registered_tokens == 0
        kw = dict(do_sample=True, top_k=1, num_return_sequences=3)  # top_k=1: deterministic sampling
        for _ in range(2):
            same(gen(m, p, **kw), gen(ref, p, **kw))
            assert m._kvmem_prefix_report.shared_blocks >= 7  # 3 rows hold the prompt's full blocks once
    finally:
        kvmem.unpatch(m)


def test_four_turn_chat_reuses_answers():
    m, ref = pair()
    ids = toks(50, 6)[None]
    kvmem.patch(m, prefix_cache=True, block_size=8)
    try:
        fractions = []
        for turn in range(4):
            out = gen(m, ids, max_new_tokens=20)
            same(out, gen(ref, ids, max_new_tokens=20))
            rep = m._kvmem_prefix_report
            fractions.append(rep.reused_fraction)
            if turn:  # the previous prompt and its answer (all but its last token) in full blocks
                assert rep.reused_tokens == (prev - 1) // 8 * 8
            assert rep.registered_tokens > 0
            prev = out.sequences.shape[1]
            ids = torch.cat([out.sequences, toks(7, 20 + turn)[None]], 1)  # the next message
    finally:
        kvmem.unpatch(m)
    assert fractions[0] == 0 and min(fractions[1:]) > 0.8


def test_lru_eviction_under_a_small_budget():
    m, ref = pair()
    a, b, c = toks(40, 7), toks(40, 8), toks(40, 9)
    kvmem.patch(m, prefix_cache=True, block_size=4, num_blocks=30)  # one call (12 blocks) + some cached
    try:
        same(gen(m, a[None]), gen(ref, a[None]))
        pool = m._kvmem_options.pool
        same(gen(m, b[None]), gen(ref, b[None]))  # a's blocks stay cached (18 free)
        same(gen(m, a[None]), gen(ref, a[None]))
        assert m._kvmem_prefix_report.reused_tokens == 36  # a was still cached
        same(gen(m, c[None]), gen(ref, c[None]))  # evicts b's least recently used blocks first
        same(gen(m, a[None]), gen(ref, a[None]))
        assert m._kvmem_prefix_report.reused_tokens == 36  # a (used recently) survived, b did not
        same(gen(m, b[None]), gen(ref, b[None]))
        assert m._kvmem_prefix_report.reused_tokens < 36
        assert m._kvmem_options.pool is pool and pool.num_blocks == {"full": 30}  # never re-created or grown
        cache = pool.live
        before = pool.manager.debug_state()
        big = toks(200, 10)[None]
        with pytest.raises(kvmem.CacheFullError, match="full"):  # 51 blocks > the budget of 30
            gen(m, big)
        assert pool.manager.debug_state() == before and pool.live is cache and not cache._released
        four = torch.stack([toks(40, 11 + r) for r in range(4)])
        with pytest.raises(kvmem.CacheFullError):  # 4 rows x 12 blocks: the call itself cannot fit
            gen(m, four)
        shared = torch.stack([torch.cat([a[:36], toks(4, 20 + r)]) for r in range(3)])
        same(gen(m, shared), gen(ref, shared))  # 3 rows sharing 9 prompt blocks: 9 + 3 x 3 fit (stored once)
    finally:
        kvmem.unpatch(m)


def test_auto_sized_pool_grows_keeping_cached_blocks():
    m, ref = pair()
    a, big = toks(40, 12), toks(300, 13)
    kvmem.patch(m, prefix_cache=True, block_size=4)
    try:
        same(gen(m, a[None]), gen(ref, a[None]))
        pool = m._kvmem_options.pool
        n0 = pool.num_blocks["full"]
        same(gen(m, big[None]), gen(ref, big[None]))  # does not fit: the pool grows
        assert m._kvmem_options.pool is pool and pool.num_blocks["full"] > n0
        same(gen(m, a[None]), gen(ref, a[None]))
        assert m._kvmem_prefix_report.reused_tokens == 36  # a's blocks survived the growth
    finally:
        kvmem.unpatch(m)


def test_two_models_and_two_kv_dtypes_never_share_blocks():
    groups = [LayerGroupSpec("full", (0, 1))]
    t = list(range(1, 30))
    ma, mb = tiny(0), tiny(1)
    fa, fb = model_fingerprint(ma), model_fingerprint(mb)
    f32, bf16 = model_fingerprint(ma, kv_dtype=torch.float32), model_fingerprint(ma, kv_dtype=torch.bfloat16)
    assert len({fa, fb}) == 2 and len({f32, bf16}) == 2
    mgr = KVCacheManager(32, 4, groups)  # one manager (pool) shared by every namespace
    mgr.add_sequence("a", t, namespace=fa)
    mgr.plan(["a"], [len(t)])
    assert mgr.add_sequence("a2", t, namespace=fa) == 28
    for i, other in enumerate((fb, bf16, None)):
        assert mgr.add_sequence(("b", i), t, namespace=other) == 0
    # Two models sharing one KVPool object: model b never finds model a's blocks.
    pool = KVPool(groups, 2, 16, 4, {"full": 64}, torch.float32, "cpu", fingerprint=fa)
    ids = torch.tensor([t])
    kvmem.patch(ma)
    kvmem.patch(mb)
    try:
        found = []
        for model, fp in ((ma, fa), (mb, fb), (ma, fa)):
            cache = kvmem.PagedKVCache(model.config, pool=pool, block_size=4)
            found.append(cache.reuse_prefix([t], namespace=fp))
            with torch.no_grad():
                model(input_ids=ids[:, found[-1]:], **{CACHE_KW: cache})
            cache.release()
    finally:
        kvmem.unpatch(ma)
        kvmem.unpatch(mb)
    assert found == [0, 0, 28]


@pytest.fixture(scope="module")
def smol():
    pkg_dir, kw = smollm2_files()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CI box: oversubscribed OpenMP threads are many times slower
    try:
        tok = transformers.AutoTokenizer.from_pretrained(pkg_dir, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(pkg_dir, dtype=torch.float32, **kw).eval()
        yield tok, model
    finally:
        torch.set_num_threads(threads)


def test_smollm2_chat_reuses_answers_and_matches_no_reuse(smol):
    """A four-turn chat through the chat template (answers re-templated as text): every turn's
    tokens and logits equal the model's without reuse, and turns 2-4 start from cached blocks
    reaching into the previous answer."""
    tok, m = smol
    system = "You are a helpful assistant. " + "Answer briefly and precisely. " * 8
    msgs = [{"role": "system", "content": system}]
    questions = ["What is a cache?", "Why is it fast?", "Name one kind.", "Thanks. Summarise."]
    chat = []
    for q in questions:  # the reference conversation, without kvmem
        msgs.append({"role": "user", "content": q})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        ref = gen(m, ids, max_new_tokens=8)
        chat.append((ids, ref))
        msgs.append({"role": "assistant", "content": tok.decode(ref.sequences[0, ids.shape[1]:],
                                                                skip_special_tokens=True)})
    kvmem.patch(m, prefix_cache=True)
    try:
        prev, into_answer = None, 0
        for turn, (ids, ref) in enumerate(chat):
            out = gen(m, ids, max_new_tokens=8)
            same(out, ref)
            rep = m._kvmem_prefix_report
            if prev is not None:  # the previous prompt's full blocks at least, often some of its answer's
                assert rep.reused_tokens >= (prev // 16) * 16 and rep.reused_fraction > 0.5
                into_answer += rep.reused_tokens > (prev // 16) * 16
            prev = ids.shape[1]
    finally:
        kvmem.unpatch(m)
    assert into_answer >= 1


def test_manager_dedup_register_tokens_and_grow():
    groups = [LayerGroupSpec("full", (0,))]
    m = KVCacheManager(16, 4, groups)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    for s in "abc":
        m.add_sequence(s, prompt)
    plan = m.plan(list("abc"), [10, 10, 10])
    slots = plan.groups["full"].slot_mapping.tolist()
    assert m.allocator("full").num_used == 2 + 3  # the 2 full blocks once, each row's partial block
    assert slots[10:18] == [-1] * 8 and slots[20:28] == [-1] * 8 and min(slots[:10]) >= 0
    assert m.block_table("a", "full")[:2] == m.block_table("b", "full")[:2] == m.block_table("c", "full")[:2]
    assert m.shared_blocks(list("abc"), "full") == 2
    m.plan(["a"], [3])  # decode: no token ids; then the answer's ids register its third block
    before = m.debug_state()
    with pytest.raises(ValueError, match="differ"):
        m.register_tokens("a", [0] * 13)
    with pytest.raises(ValueError, match="expected >= 13"):
        m.register_tokens("a", prompt)
    assert m.debug_state() == before
    assert m.register_tokens("a", prompt + [11, 12, 13]) == 1
    assert m.add_sequence("d", prompt + [11, 12, 13, 14]) == 12
    a = m.allocator("full")
    cached = a.debug_state()["hashes"]
    m.grow(24)
    assert a.num_blocks == 24 and a.debug_state()["hashes"] == cached and a.num_free == 24 - a.num_used
    a.check_invariants()
    with pytest.raises(ValueError, match="must be >= 24"):
        m.grow(20)


def test_smollm2_prefix_reuse_cases_match_no_reuse(smol):
    """The issue's reuse cases on the real model (fp32 CPU), each against the same model without
    kvmem: identical greedy tokens, logits within 1e-4. A repeated prompt; divergence inside a block
    and at a block boundary; a batch of 4 sharing a prefix (first call: the pre-pass computes it
    once, the rows store it once: block counts asserted); beams and num_return_sequences; LRU
    eviction under a budget that cannot hold everything."""
    _, m = smol
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(100, m.config.vocab_size, (n,), generator=g)  # noqa: E731
    base = rand(70)
    singles = [base, base, torch.cat([base[:40], rand(12)]), torch.cat([base[:48], rand(12)])]
    prefix = rand(96)
    batch = torch.stack([torch.cat([prefix, rand(10)]) for _ in range(4)])
    beam_prompt = rand(37)[None]
    refs = [gen(m, p[None], max_new_tokens=4) for p in singles]
    ref_batch = gen(m, batch, max_new_tokens=4)
    ref_beams = gen(m, beam_prompt, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    kvmem.patch(m, prefix_cache=True, block_size=16)
    try:
        reused = []
        for p, ref in zip(singles, refs):
            same(gen(m, p[None], max_new_tokens=4), ref)
            reused.append(m._kvmem_prefix_report.reused_tokens)
        assert reused == [0, 64, 32, 48]  # repeated: 4 blocks; mid-block 40 -> 2 blocks; boundary 48 -> 3
        out = gen(m, batch, max_new_tokens=4)
        same(out, ref_batch)
        rep = m._kvmem_prefix_report
        cache = output_cache(out)
        tables = [cache.manager.block_table(s, "full") for s in cache._seq_ids]
        assert rep.prepass_tokens == 96 and rep.reused_per_row == [96] * 4
        assert all(t[:6] == tables[0][:6] for t in tables) and len({t[6] for t in tables}) == 4
        assert rep.shared_blocks == 6
        same(gen(m, beam_prompt, max_new_tokens=4, num_beams=3, num_return_sequences=2), ref_beams)
        assert m._kvmem_prefix_report.prepass_tokens == 32  # 3 beams of one prompt: its 2 full blocks once
    finally:
        kvmem.unpatch(m)
    a, b, c = base, rand(70), rand(70)
    want = {id(x): gen(m, x[None], max_new_tokens=4) for x in (b, c)}
    want[id(a)] = refs[0]
    kvmem.patch(m, prefix_cache=True, block_size=16, num_blocks=12)  # one call (5 blocks) + a few cached
    try:
        got = []
        for x in (a, b, a, c, a, b):  # c evicts b's least recently used blocks, not a's
            same(gen(m, x[None], max_new_tokens=4), want[id(x)])
            got.append(m._kvmem_prefix_report.reused_tokens)
        pool = m._kvmem_options.pool
    finally:
        kvmem.unpatch(m)
    assert got[:3] == [0, 0, 64] and got[4] == 64 and got[5] < 64
    assert pool.num_blocks == {"full": 12}  # the budget: never grown
