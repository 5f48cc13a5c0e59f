"""KVCacheManager: per-sequence bookkeeping, plan() metadata, sliding-window freeing, COW, prefix
reuse, atomic CacheFullError, and end-to-end attention through kvmem.ops.reference."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmem.cache import CacheFullError, KVCacheManager, LayerGroupSpec, block_hashes, page_bytes
from kvmem.ops.reference import cache_write, paged_attention, visible_key_range

FULL = LayerGroupSpec("full", (0,))


def cdiv(a, b):
    return -(-a // b)


def full_manager(num_blocks=16, block_size=4, **kw):
    return KVCacheManager(num_blocks, block_size, [FULL], **kw)


def meta_lists(meta):
    return (
        meta.block_table.tolist(),
        meta.seq_lens.tolist(),
        meta.cu_seqlens_q.tolist(),
        meta.slot_mapping.tolist(),
        meta.max_seqlen_q,
        meta.max_seqlen_k,
    )


def check_refcounts(m):
    """Every block's refcount equals the number of sequences referencing it; nothing leaks."""
    for spec in m.groups:
        a = m.allocator(spec.name)
        a.check_invariants()
        counts = {}
        for sid in m.seq_ids:
            table = m.block_table(sid, spec.name)
            assert len(table) == cdiv(m.seq_len(sid), m.block_size)
            live = [b for b in table if b >= 0]
            assert len(set(live)) == len(live)
            for b in live:
                counts[b] = counts.get(b, 0) + 1
            if spec.window is None:
                assert len(live) == len(table)
            else:
                # Only blocks no query at >= seq_len can see may have been freed, and only a prefix.
                lo = max(0, m.seq_len(sid) - spec.window + 1)
                dead = [i for i, b in enumerate(table) if b < 0]
                assert dead == list(range(len(dead)))
                assert all((i + 1) * m.block_size <= lo for i in dead)
        for b in range(a.num_blocks):
            assert a.refcount(b) == counts.get(b, 0), (spec.name, b)
        assert a.num_used == len(counts) and a.num_used + a.num_free == a.num_blocks


# ----------------------------------------------------------------- plan() metadata by hand


def test_prefill_metadata():
    m = full_manager()
    m.add_sequence("a")
    m.add_sequence("b")
    plan = m.plan(["a", "b"], [5, 9])
    table, lens, cu, slots, mq, mk = meta_lists(plan.groups["full"])
    assert table == [[0, 1, -1], [2, 3, 4]]
    assert lens == [5, 9] and cu == [0, 5, 14] and (mq, mk) == (9, 9)
    assert slots == [0, 1, 2, 3, 4] + list(range(8, 17))
    meta = plan.groups["full"]
    assert meta.block_table.dtype == torch.int32 and meta.seq_lens.dtype == torch.int32
    assert meta.cu_seqlens_q.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
    assert plan.for_layer(0) is meta and plan.num_tokens == 14 and plan.seq_ids == ("a", "b")
    with pytest.raises(KeyError, match="layer 3"):
        plan.for_layer(3)


def test_chunked_prefill_metadata():
    m = full_manager()
    m.add_sequence("a")
    expected = [
        ([[0]], [4], [0, 4], [0, 1, 2, 3]),
        ([[0, 1]], [8], [0, 4], [4, 5, 6, 7]),
        ([[0, 1, 2]], [10], [0, 2], [8, 9]),
    ]
    for n, (table, lens, cu, slots) in zip([4, 4, 2], expected):
        got = meta_lists(m.plan(["a"], [n]).groups["full"])
        assert got == (table, lens, cu, slots, n, lens[0])
    assert m.seq_len("a") == 10


def test_decode_and_mixed_batch_metadata():
    m = full_manager()
    for sid, n in (("a", 6), ("b", 3)):
        m.add_sequence(sid)
        m.plan([sid], [n])
    m.add_sequence("c")
    got = meta_lists(m.plan(["b", "a", "c"], [1, 0, 5]).groups["full"])
    assert got == ([[2, -1], [0, 1], [3, 4]], [4, 6, 5], [0, 1, 1, 6], [11, 12, 13, 14, 15, 16], 5, 6)
    got = meta_lists(m.plan(["a", "b", "c"], [1, 1, 1]).groups["full"])
    assert got == ([[0, 1], [2, 5], [3, 4]], [7, 5, 6], [0, 1, 2, 3], [6, 20, 17], 1, 7)


def test_padding_and_fixed_width():
    m = full_manager(max_blocks_per_seq=4)
    m.add_sequence("a")
    plan = m.plan(["a"], [5], pad_batch_to=3, pad_tokens_to=8)
    table, lens, cu, slots, _, _ = meta_lists(plan.groups["full"])
    assert table == [[0, 1, -1, -1]] + [[-1] * 4] * 2
    assert lens == [5, 0, 0] and cu == [0, 5, 5, 5]
    assert slots == [0, 1, 2, 3, 4, -1, -1, -1]
    before = m.debug_state()
    for kw in ({"pad_batch_to": 0}, {"pad_tokens_to": 2}, {"max_blocks_per_seq": 1}):
        with pytest.raises(ValueError):
            m.plan(["a"], [3], **kw)
    with pytest.raises(ValueError, match="max_blocks_per_seq=4"):
        m.plan(["a"], [12])
    assert m.debug_state() == before
    assert m.plan(["a"], [3], max_blocks_per_seq=6).groups["full"].block_table.shape == (1, 6)


def test_plan_argument_errors_change_nothing():
    m = full_manager(num_blocks=4)
    m.add_sequence("a", [1, 2, 3])
    before = m.debug_state()
    bad = [
        ((["a", "a"], [1, 1]), {}, ValueError),
        ((["zz"], [1]), {}, ValueError),
        ((["a"], [-1]), {}, ValueError),
        ((["a"], [1, 2]), {}, ValueError),
        ((["a"], [1.0]), {}, TypeError),
        ((["a"], [2]), {"token_ids": [[1, 9]]}, ValueError),  # disagrees with the prompt
        ((["a"], [2]), {"token_ids": [[1]]}, ValueError),
        ((["a"], [2]), {"token_ids": [[1, "x"]]}, TypeError),
    ]
    for args, kw, exc in bad:
        with pytest.raises(exc):
            m.plan(*args, **kw)
        assert m.debug_state() == before
    with pytest.raises(ValueError):
        m.add_sequence("a")
    with pytest.raises(ValueError):
        m.truncate("a", 1)  # longer than the (empty) sequence
    assert m.debug_state() == before


def test_empty_batch():
    m = full_manager()
    meta = m.plan([], []).groups["full"]
    assert meta.block_table.shape == (0, 1) and meta.cu_seqlens_q.tolist() == [0]
    assert meta.slot_mapping.shape == (0,) and (meta.max_seqlen_q, meta.max_seqlen_k) == (0, 0)


# ------------------------------------------------------------------------ sliding window


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
def test_sliding_frees_exactly_the_invisible_blocks(block_size, window):
    m = KVCacheManager(64, block_size, [LayerGroupSpec("swa", (0,), window=window)])
    a = m.allocator("swa")
    m.add_sequence("s")
    m.plan(["s"], [3])  # prefill: its first query sits at 0 and sees key 0, so nothing is freed
    assert -1 not in m.block_table("s", "swa")
    for old_len in range(3, 30):
        meta = m.plan(["s"], [1]).groups["swa"]
        table = m.block_table("s", "swa")
        lo, hi = visible_key_range(old_len + 1, 1, True, window)
        assert lo == max(0, old_len - window + 1) and hi == old_len + 1
        freed = [i for i, b in enumerate(table) if b < 0]
        # Freed: exactly the blocks whose keys all lie below lo (so the block holding lo is kept).
        assert freed == [i for i in range(len(table)) if (i + 1) * block_size <= lo]
        assert meta.block_table.tolist()[0][: len(table)] == table
        assert a.num_used == len(table) - len(freed)
        check_refcounts(m)


def test_sliding_chunk_keeps_keys_of_its_first_query():
    m = KVCacheManager(64, 2, [LayerGroupSpec("swa", (0,), window=3)])
    m.add_sequence("s")
    m.plan(["s"], [10])
    assert -1 not in m.block_table("s", "swa")  # query 0 of the chunk saw key 0
    m.plan(["s"], [4])  # first query at 10 sees keys 8..10: blocks 0..3 (keys 0..7) are dead
    assert m.block_table("s", "swa")[:5] == [-1, -1, -1, -1, m.block_table("s", "swa")[4]]
    assert m.block_table("s", "swa")[4] >= 0


def test_sliding_group_runs_in_a_bounded_pool():
    # Window 3, block 2: a query needs at most 2 live blocks; freeing happens before allocation.
    m = KVCacheManager({"full": 64, "swa": 2}, 2, [FULL, LayerGroupSpec("swa", (1,), window=3)])
    m.add_sequence("s")
    for _ in range(60):
        m.plan(["s"], [1])
    assert m.allocator("swa").num_used == 2
    check_refcounts(m)
    u = m.usage()
    # The last step's query, at 59, saw keys >= 57: blocks 0..27 (keys 0..55) are freed.
    assert u["full"].num_tokens == 60 and u["swa"].num_tokens == 60 - 28 * 2
    with pytest.raises(CacheFullError) as ei:
        m.plan(["s"], [7])
    assert ei.value.group == "swa"


def test_truncate_into_freed_window_is_rejected():
    m = KVCacheManager(64, 2, [FULL, LayerGroupSpec("swa", (1,), window=3)])
    m.add_sequence("s")
    m.plan(["s"], [10])
    m.plan(["s"], [1])  # frees blocks 0..3 of "swa"
    before = m.debug_state()
    with pytest.raises(ValueError, match="already freed"):
        m.truncate("s", 6)
    assert m.debug_state() == before
    m.truncate("s", 10)  # a query at 10 sees keys 8, 9: still held
    m.truncate("s", 0)
    assert m.block_table("s", "swa") == [] and m.seq_len("s") == 0
    check_refcounts(m)
    # The emptied sequence grows again and its window frees blocks again.
    for _ in range(12):
        m.plan(["s"], [1])
    table = m.block_table("s", "swa")  # the last query, at 11, saw keys >= 9: blocks 0..3 freed
    assert table[:4] == [-1] * 4 and min(table[4:]) >= 0
    assert m.allocator("swa").num_used == 2 and m.usage()["swa"].num_tokens == 4
    check_refcounts(m)


# ------------------------------------------------------------------- fork, COW, truncate


def test_fork_and_copy_on_write_data():
    m = full_manager(num_blocks=8, block_size=4)
    pools = m.make_pools(1, 2, torch.float32, fill=float("nan"))
    k, v = pools[0]
    m.add_sequence("a")
    slots = m.extend("a", 6)["full"]
    vals = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 1, 2)
    cache_write(vals, -vals, k, v, torch.tensor(slots))
    m.fork("a", "b")
    ta = m.block_table("a", "full")
    assert m.block_table("b", "full") == ta and m.allocator("full").refcount(ta[1]) == 2
    # a appends into its shared partial block: copy-on-write.
    slots_a = m.extend("a", 1)["full"]
    ta2 = m.block_table("a", "full")
    assert ta2[0] == ta[0] and ta2[1] != ta[1]
    assert m.pending_copies["full"] == [(ta[1], ta2[1])]
    assert slots_a == [ta2[1] * 4 + 2]
    # b now holds the old block alone: it writes in place, no copy.
    slots_b = m.extend("b", 1)["full"]
    assert m.block_table("b", "full") == ta and slots_b == [ta[1] * 4 + 2]
    assert len(m.pending_copies["full"]) == 1
    m.apply_copies(pools)
    assert m.pending_copies["full"] == []
    cache_write(torch.full((1, 1, 2), 100.0), torch.full((1, 1, 2), -100.0), k, v, torch.tensor(slots_a))
    cache_write(torch.full((1, 1, 2), 200.0), torch.full((1, 1, 2), -200.0), k, v, torch.tensor(slots_b))
    for sid, last in (("a", 100.0), ("b", 200.0)):
        t = m.block_table(sid, "full")
        got = torch.stack([k[t[p // 4], p % 4, 0, 0] for p in range(7)])
        assert got.tolist() == [0, 1, 2, 3, 4, 5, last]
        got_v = torch.stack([v[t[p // 4], p % 4, 0, 1] for p in range(7)])
        assert got_v.tolist() == [0, -1, -2, -3, -4, -5, -last]
    check_refcounts(m)


def test_no_copy_when_fork_is_block_aligned():
    m = full_manager(block_size=4)
    m.add_sequence("a")
    m.extend("a", 8)
    m.fork("a", "b")
    m.plan(["a", "b"], [1, 1])
    assert m.pending_copies["full"] == []
    ta, tb = m.block_table("a", "full"), m.block_table("b", "full")
    assert ta[:2] == tb[:2] and ta[2] != tb[2]


def test_plan_cow_two_forks_in_one_step_and_copies_reported():
    m = full_manager(block_size=4)
    m.add_sequence("a")
    m.extend("a", 5)
    for sid in ("b", "c"):
        m.fork("a", sid)
    shared = m.block_table("a", "full")[1]
    plan = m.plan(["a", "b", "c"], [1, 1, 1])
    # a and b copy; c is then the last holder and writes in place.
    assert [m.block_table(s, "full")[1] == shared for s in "abc"] == [False, False, True]
    assert plan.copies["full"] == tuple(m.pending_copies["full"])
    assert [src for src, _ in plan.copies["full"]] == [shared, shared]
    assert m.allocator("full").refcount(shared) == 1
    check_refcounts(m)


def test_apply_copies_is_sequential():
    m = full_manager(num_blocks=4, block_size=1)
    pool = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1)
    m.pending_copies["full"] = [(0, 1), (1, 2), (3, 0)]  # 1<-0, then 2<-1 (reads the new 1), 0<-3
    m.apply_copies({0: pool})
    assert pool.flatten().tolist() == [3, 0, 0, 3]
    m.pending_copies["full"] = [(0, 1)]
    with pytest.raises(ValueError, match="layer 0"):
        m.apply_copies({})
    with pytest.raises(ValueError, match="at least 4 blocks"):
        m.apply_copies({0: pool[:2]})
    assert m.pending_copies["full"] == [(0, 1)]


def test_truncate_frees_tail_and_unhashes_rewritten_block():
    m = full_manager(num_blocks=8, block_size=4)
    toks = list(range(10))
    m.add_sequence("a", toks)
    m.plan(["a"], [10], token_ids=[toks])
    a = m.allocator("full")
    t = m.block_table("a", "full")
    assert a.num_used == 3 and a.block_hash(t[1]) is not None
    m.truncate("a", 6)
    assert m.block_table("a", "full") == t[:2] and a.num_used == 2
    assert a.block_hash(t[1]) is not None  # still cached until it is written into
    m.plan(["a"], [1], token_ids=[[42]])
    assert a.block_hash(t[1]) is None and m.pending_copies["full"] == []
    # A new sequence with the old prompt no longer matches block 1.
    assert m.add_sequence("b", toks) == 4
    check_refcounts(m)


# ------------------------------------------------------------------------ prefix reuse


def test_prefix_reuse_shares_blocks_and_saves_allocation():
    m = full_manager(num_blocks=16, block_size=4)
    a = m.allocator("full")
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert m.add_sequence("a", prompt) == 0
    m.plan(["a"], [10], token_ids=[prompt])
    ta = m.block_table("a", "full")
    used = a.num_used
    # Same 8-token prefix (2 full blocks), different tail.
    assert m.add_sequence("b", prompt[:8] + [1, 2, 3]) == 8
    assert m.block_table("b", "full") == ta[:2] and a.num_used == used
    assert [a.refcount(b) for b in ta] == [2, 2, 1]
    m.plan(["b"], [3], token_ids=[[1, 2, 3]])
    assert a.num_used == used + 1  # only the new tail block was allocated
    # Exactly block-aligned prompt: the last block is recomputed so the last token has logits.
    assert m.add_sequence("c", prompt[:8]) == 4
    # A different first token shares nothing.
    assert m.add_sequence("d", [0] + prompt[1:]) == 0
    # Freed blocks stay reusable at refcount 0 ...
    for sid in ("a", "b", "c", "d"):
        m.free_sequence(sid)
    assert a.num_used == 0 and a.num_free == 16
    assert m.add_sequence("e", prompt + [99]) == 8
    assert m.block_table("e", "full") == ta[:2]
    m.free_sequence("e")
    # ... until allocation pressure evicts them.
    m.add_sequence("f")
    m.plan(["f"], [16 * 4])
    m.free_sequence("f")
    assert m.add_sequence("g", prompt) == 0
    check_refcounts(m)


def test_prefix_reuse_with_sliding_group_needs_only_the_window():
    groups = [FULL, LayerGroupSpec("swa", (1,), window=3)]
    m = KVCacheManager({"full": 64, "swa": 16}, 2, groups)
    prompt = list(range(12))
    m.add_sequence("a", prompt)
    m.plan(["a"], [12], token_ids=[prompt])
    ta = m.block_table("a", "swa")
    m.plan(["a"], [1], token_ids=[[50]])  # a query at 12 sees keys >= 10: swa blocks 0..4 freed
    swa = m.allocator("swa")
    assert m.block_table("a", "swa")[:6] == [-1] * 5 + ta[5:6]
    assert swa.num_cached_free == 5  # freed, but kept for prefix reuse
    # Evict the cached swa blocks 0, 1, 2 by allocation pressure (least recently freed first).
    m.add_sequence("x")
    m.plan(["x"], [2 * (swa.num_free - 2)])
    hashes = block_hashes(prompt, 2)
    assert [swa.lookup(h) for h in hashes[:5]] == [None, None, None, ta[3], ta[4]]
    # 5 blocks reused: a query at 10 sees keys >= 8 only, so swa needs just block 4 (cached free).
    assert m.add_sequence("b", prompt) == 10
    assert m.block_table("b", "swa") == [-1] * 4 + [ta[4]]
    assert m.block_table("b", "full") == m.block_table("a", "full")[:5]
    check_refcounts(m)


# --------------------------------------------------------------------- CacheFullError


def test_cache_full_is_atomic_across_groups():
    groups = [FULL, LayerGroupSpec("swa", (1,), window=64)]
    for nb in ({"full": 4, "swa": 32}, {"full": 32, "swa": 4}):
        m = KVCacheManager(nb, 4, groups)
        for sid in "ab":
            m.add_sequence(sid)
        m.plan(["a"], [9])
        m.fork("a", "c")
        before = m.debug_state()
        with pytest.raises(CacheFullError) as ei:
            m.plan(["c", "b"], [1, 8])  # COW block + 2 new blocks for b: 3 needed, 1 free
        e = ei.value
        small = min(nb, key=nb.get)
        assert (e.group, e.blocks_needed, e.blocks_free, e.num_blocks) == (small, 3, 1, 4)
        assert "num_blocks=6" in str(e)
        assert m.debug_state() == before
        with pytest.raises(CacheFullError):
            m.extend("b", 17)
        assert m.debug_state() == before
        m.plan(["c"], [1])  # fits
        check_refcounts(m)


def test_usage_bytes():
    per = page_bytes(2, 4, 2, 8, torch.float16)
    assert per == 2 * 2 * 4 * 2 * 8 * 2
    m = KVCacheManager(10, 4, [LayerGroupSpec("full", (0, 1))], bytes_per_block=per)
    m.add_sequence("a")
    m.plan(["a"], [9])
    u = m.usage()["full"]
    assert (u.blocks_used, u.blocks_free, u.num_tokens) == (3, 7, 9)
    assert (u.bytes_used, u.bytes_total) == (3 * per, 10 * per) and u.utilization == 0.3
    assert full_manager().usage()["full"].bytes_used is None


def test_bad_construction():
    with pytest.raises(ValueError):
        KVCacheManager(8, 4, [FULL, LayerGroupSpec("x", (0,))])  # layer in two groups
    with pytest.raises(ValueError):
        KVCacheManager(8, 4, [FULL, LayerGroupSpec("full", (1,))])
    with pytest.raises(TypeError):
        KVCacheManager(8, 4, [])
    with pytest.raises(ValueError):
        LayerGroupSpec("w", (0,), window=0)
    with pytest.raises(ValueError):
        KVCacheManager(8, 0, [FULL])


# ------------------------------------------------- stateful: bookkeeping and page contents

BASES = [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0, 2, 2]]


def rolling(prev, token):
    """Stand-in for a key: depends on the whole prefix (as real keys do); exact in fp32."""
    return float((int(prev) * 31 + token + 1) % 1_000_003)


class ManagerMachine(RuleBasedStateMachine):
    """Random add/plan/extend/fork/truncate/free against a model of every sequence's keys.

    Pools are real ([num_blocks, block_size, 1, 1] fp32, NaN-filled); after each step the new
    tokens' values are written through ``slot_mapping`` and every key a future query may read is
    checked in the pools, so wrong COW, wrong prefix reuse or a reused block still in use shows up.
    """

    @initialize(
        bs=st.integers(1, 4), window=st.integers(1, 7), nb_full=st.integers(3, 16), nb_swa=st.integers(2, 10)
    )
    def setup(self, bs, window, nb_full, nb_swa):
        self.bs = bs
        groups = [FULL, LayerGroupSpec("swa", (1,), window=window)]
        self.m = KVCacheManager({"full": nb_full, "swa": nb_swa}, bs, groups)
        self.pools = self.m.make_pools(1, 1, torch.float32, fill=float("nan"))
        self.seqs = {}  # id -> {"tokens": computed tokens, "vals": their keys, "pending": prompt rest}
        self.next_id = 0

    # -- helpers
    def _new_tokens(self, data, sid, n):
        s = self.seqs[sid]
        return (s["pending"] + data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))[:n]

    def _commit(self, sid, new):
        s = self.seqs[sid]
        for t in new:
            s["vals"].append(rolling(s["vals"][-1] if s["vals"] else 7, t))
        s["tokens"] += new
        s["pending"] = s["pending"][len(new):]

    def _write(self, slots_by_group, values):
        vals = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)
        for layer, g in ((0, "full"), (1, "swa")):
            k, v = self.pools[layer]
            cache_write(vals, vals, k, v, torch.as_tensor(slots_by_group[g], dtype=torch.int64))

    def _cow_state(self, sid):
        L = self.m.seq_len(sid)
        return {g: (self.m.block_table(sid, g)[L // self.bs] if L % self.bs else None) for g in ("full", "swa")}

    # -- rules
    @rule(base=st.integers(0, 1), cut=st.integers(0, 14), suffix=st.lists(st.integers(0, 2), max_size=4),
          with_tokens=st.booleans())
    def add(self, base, cut, suffix, with_tokens):
        prompt = BASES[base][:cut] + suffix
        sid = self.next_id
        self.next_id += 1
        cached = self.m.add_sequence(sid, prompt if with_tokens else None)
        assert cached % self.bs == 0 and cached <= max(0, len(prompt) - 1)
        assert with_tokens or cached == 0
        self.seqs[sid] = {"tokens": [], "vals": [], "pending": prompt}
        self._commit(sid, prompt[:cached])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def plan(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), min_size=1, max_size=4, unique=True))
        nums = [data.draw(st.integers(0, 5)) for _ in ids]
        toks = [self._new_tokens(data, sid, n) for sid, n in zip(ids, nums)]
        give = data.draw(st.booleans())
        old = {sid: (self.m.seq_len(sid), self._cow_state(sid)) for sid in ids}
        before = self.m.debug_state()
        n_copies = {g: len(c) for g, c in self.m.pending_copies.items()}
        try:
            plan = self.m.plan(ids, nums, token_ids=toks if give else None)
        except CacheFullError as e:
            assert self.m.debug_state() == before
            assert e.blocks_needed > e.blocks_free
            return
        # Metadata against the manager's tables.
        starts = np.cumsum([0] + nums)
        for g, meta in plan.groups.items():
            table, lens, cu, slots, mq, mk = meta_lists(meta)
            assert cu == starts.tolist() and (mq, mk) == (max(nums), max(lens))
            for r, sid in enumerate(ids):
                row = self.m.block_table(sid, g)
                assert table[r] == row + [-1] * (len(table[r]) - len(row))
                assert lens[r] == old[sid][0] + nums[r] == self.m.seq_len(sid)
                for i in range(nums[r]):
                    p = old[sid][0] + i
                    if slots[starts[r] + i] == -1:  # a new full block shared with a cached one / another row's
                        b = row[p // self.bs]
                        assert (p // self.bs) * self.bs >= old[sid][0] and self.m.allocator(g).block_hash(b) is not None
                        continue
                    assert slots[starts[r] + i] == row[p // self.bs] * self.bs + p % self.bs
            written = [x for x in slots if x >= 0]
            assert len(set(written)) == len(written)
            if self.m.groups[1].name == g:
                # Sliding group: every block no query at >= the step's first position sees is freed.
                for sid in ids:
                    lo = max(0, old[sid][0] - self.m.groups[1].window + 1)
                    row = self.m.block_table(sid, g)
                    assert all(row[i] < 0 for i in range(lo // self.bs)), (sid, row, lo)
            # Copy-on-write happened exactly for sequences whose shared last partial block changed.
            new_copies = self.m.pending_copies[g][n_copies[g]:]
            expected = []
            for r, sid in enumerate(ids):
                was = old[sid][1][g]
                if nums[r] and was is not None:
                    now = self.m.block_table(sid, g)[old[sid][0] // self.bs]
                    if now != was:
                        expected.append((was, now))
                        assert self.m.allocator(g).refcount(was) >= 1  # it really was shared
                    else:
                        assert self.m.allocator(g).refcount(was) == 1  # written in place: sole holder
            assert new_copies == expected
        self.m.apply_copies(self.pools)
        values = []
        for sid, new in zip(ids, toks):
            self._commit(sid, new)
            values += self.seqs[sid]["vals"][len(self.seqs[sid]["vals"]) - len(new):]
        self._write({g: meta.slot_mapping for g, meta in plan.groups.items()}, values)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def extend(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        n = data.draw(st.integers(0, 6))
        new = self._new_tokens(data, sid, n)
        L = self.m.seq_len(sid)
        shared = {
            g: n > 0 and b is not None and self.m.allocator(g).refcount(b) > 1 for g, b in self._cow_state(sid).items()
        }
        before = self.m.debug_state()
        n_copies = {g: len(c) for g, c in self.m.pending_copies.items()}
        try:
            slots = self.m.extend(sid, n, new if data.draw(st.booleans()) else None)
        except CacheFullError:
            assert self.m.debug_state() == before
            return
        for g in ("full", "swa"):
            # COW exactly when the last partial block is shared.
            assert len(self.m.pending_copies[g]) - n_copies[g] == int(shared[g])
            if shared[g]:
                assert self.m.pending_copies[g][-1][1] == self.m.block_table(sid, g)[L // self.bs]
        self.m.apply_copies(self.pools)
        self._commit(sid, new)
        self._write(slots, self.seqs[sid]["vals"][L:])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(sorted(self.seqs)))
        sid = self.next_id
        self.next_id += 1
        self.m.fork(src, sid)
        s = self.seqs[src]
        self.seqs[sid] = {"tokens": list(s["tokens"]), "vals": list(s["vals"]), "pending": list(s["pending"])}

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        L = self.m.seq_len(sid)
        new_len = data.draw(st.integers(0, L))
        before = self.m.debug_state()
        try:
            self.m.truncate(sid, new_len)
        except ValueError:
            assert self.m.debug_state() == before
            table = self.m.block_table(sid, "swa")
            assert new_len > 0 and table[max(0, new_len - self.m.groups[1].window + 1) // self.bs] < 0
            return
        s = self.seqs[sid]
        s["tokens"], s["vals"], s["pending"] = s["tokens"][:new_len], s["vals"][:new_len], []

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.m.free_sequence(sid)
        del self.seqs[sid]

    # -- invariants
    @invariant()
    def bookkeeping(self):
        if hasattr(self, "m"):
            check_refcounts(self.m)

    @invariant()
    def contents(self):
        if not hasattr(self, "m"):
            return
        window = self.m.groups[1].window
        for sid, s in self.seqs.items():
            L = self.m.seq_len(sid)
            assert L == len(s["vals"])
            for layer, g in ((0, "full"), (1, "swa")):
                table = self.m.block_table(sid, g)
                lo = 0 if g == "full" else max(0, L - window + 1)  # keys the next query may see
                k = self.pools[layer][0]
                got = [k[table[p // self.bs], p % self.bs, 0, 0].item() for p in range(lo, L)]
                assert got == s["vals"][lo:], (sid, g)

    def teardown(self):
        if hasattr(self, "m"):
            for sid in list(self.seqs):
                self.m.free_sequence(sid)
            for spec in self.m.groups:
                a = self.m.allocator(spec.name)
                assert a.num_free == a.num_blocks and a.num_used == 0  # no leak


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(
    max_examples=120, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ------------------------------------------- end to end: plan() + reference ops vs dense

NUM_LAYERS, HQ, HKV, D = 4, 4, 2, 8
E2E_GROUPS = [LayerGroupSpec("full", (0, 2)), LayerGroupSpec("swa", (1, 3), window=5)]


class World:
    """Token histories and their K/V: K/V of a position depend on the whole prefix (so prefix reuse
    is valid), queries are random."""

    def __init__(self, seed):
        self.kv_cache = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = {}

    def kv(self, prefix):
        key = tuple(prefix)
        if key not in self.kv_cache:
            g = torch.Generator().manual_seed(hash(key) & 0x7FFFFFFF)
            self.kv_cache[key] = torch.randn(NUM_LAYERS, 2, HKV, D, generator=g)
        return self.kv_cache[key]

    def history(self, sid, layer):
        toks = self.tokens[sid]
        kv = torch.stack([self.kv(toks[: p + 1])[layer] for p in range(len(toks))])  # [L, 2, Hkv, D]
        return kv[:, 0], kv[:, 1]


def dense_attention(q, k, v, first_pos, window, scale):
    """q: [n, Hq, D] at positions first_pos.., k/v: [L, Hkv, D]; causal (+ window) softmax."""
    n, L = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    qp = torch.arange(first_pos, first_pos + n)[:, None]
    kp = torch.arange(L)[None, :]
    visible = kp <= qp
    if window is not None:
        visible &= kp > qp - window
    s = s.masked_fill(~visible, -math.inf)
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))  # (torch.softmax is slow on tiny CPU inputs)
    return torch.einsum("hqk,khd->qhd", p / p.sum(dim=-1, keepdim=True), v)


def run_step(m, world, pools, batch, give_tokens=True):
    """batch: list of (seq_id, new tokens). Plans, writes K/V, attends, compares with dense."""
    ids = [sid for sid, _ in batch]
    old = {sid: m.seq_len(sid) for sid in ids}
    plan = m.plan(ids, [len(t) for _, t in batch], token_ids=[t for _, t in batch] if give_tokens else None)
    m.apply_copies(pools)
    for sid, new in batch:
        world.tokens[sid] = world.tokens[sid] + new
    scale = D**-0.5
    for layer in range(NUM_LAYERS):
        meta = plan.for_layer(layer)
        kv = [world.kv(world.tokens[sid][: old[sid] + i + 1])[layer] for sid, new in batch for i in range(len(new))]
        if not kv:
            continue
        kv = torch.stack(kv)
        k_cache, v_cache = pools[layer]
        cache_write(kv[:, 0], kv[:, 1], k_cache, v_cache, meta.slot_mapping)
        q = torch.randn(kv.shape[0], HQ, D, generator=world.gen)
        out, _ = paged_attention(
            q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.cu_seqlens_q,
            meta.max_seqlen_q, meta.max_seqlen_k, scale=scale, causal=True, window=meta.window,
        )
        assert torch.isfinite(out).all(), f"layer {layer}: read a NaN (freed or unwritten slot)"
        start = 0
        for sid, new in batch:
            n = len(new)
            if n == 0:
                continue
            k_hist, v_hist = world.history(sid, layer)
            want = dense_attention(q[start : start + n], k_hist, v_hist, old[sid], meta.window, scale)
            err = (out[start : start + n] - want).abs().max().item()
            assert err < 1e-5, f"layer {layer}, sequence {sid!r}: max error {err}"
            start += n
    return plan


def e2e_manager(num_blocks=48, block_size=4):
    m = KVCacheManager(num_blocks, block_size, E2E_GROUPS)
    return m, m.make_pools(HKV, D, torch.float32, fill=float("nan"))


def test_end_to_end_prefill_chunked_decode_fork_prefix_truncate():
    m, pools = e2e_manager()
    world = World(0)
    rng = random.Random(0)
    prompt_a = [rng.randrange(50) for _ in range(7)]
    prompt_b = [rng.randrange(50) for _ in range(11)]
    for sid, p in (("a", prompt_a), ("b", prompt_b), ("c", None)):
        assert m.add_sequence(sid, p) == 0
        world.tokens[sid] = []
    run_step(m, world, pools, [("a", prompt_a), ("b", prompt_b[:6])])  # prefill + chunked prefill
    run_step(m, world, pools, [("a", [1]), ("b", prompt_b[6:]), ("c", [3, 4, 5])])  # mixed
    m.fork("a", "a2")  # beam search: a2 shares a's blocks, including the partial last one
    world.tokens["a2"] = list(world.tokens["a"])
    for step in range(8):
        batch = [(sid, [rng.randrange(50)]) for sid in ("a", "a2", "b", "c")]
        if step == 2:
            batch[0] = ("a", [rng.randrange(50) for _ in range(3)])  # a multi-token (speculative) step
        run_step(m, world, pools, batch)
        check_refcounts(m)
    assert any(b < 0 for b in m.block_table("b", "swa"))  # the window freed blocks
    # Crop a by one token (rejected draft), then continue.
    m.truncate("a", m.seq_len("a") - 1)
    world.tokens["a"] = world.tokens["a"][:-1]
    # A new sequence sharing b's prompt reuses b's cached prefix blocks.
    assert m.add_sequence("d", prompt_b) == 8
    world.tokens["d"] = prompt_b[:8]
    m.free_sequence("c")
    del world.tokens["c"]
    run_step(m, world, pools, [("a", [7, 8]), ("d", prompt_b[8:]), ("b", [9])])
    for _ in range(4):
        run_step(m, world, pools, [(sid, [rng.randrange(50)]) for sid in ("a", "a2", "b", "d")])
    check_refcounts(m)
    for sid in list(world.tokens):
        m.free_sequence(sid)
    assert all(m.allocator(g.name).num_used == 0 for g in m.groups)


@given(seed=st.integers(0, 2**16), block_size=st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=12, deadline=None)
def test_end_to_end_random_schedule(seed, block_size):
    m, pools = e2e_manager(num_blocks=256 // block_size + 8, block_size=block_size)
    world = World(seed)
    rng = random.Random(seed)
    base = [rng.randrange(4) for _ in range(12)]
    next_id = 0
    pending = {}  # prompt tokens not yet computed (the manager knows them)
    for step in range(10):
        if len(world.tokens) < 3 or rng.random() < 0.2:
            prompt = base[: rng.randrange(13)] + [rng.randrange(4) for _ in range(rng.randrange(4))]
            sid = next_id
            next_id += 1
            cached = m.add_sequence(sid, prompt)
            world.tokens[sid] = prompt[:cached]
            pending[sid] = prompt[cached:]
        if world.tokens and rng.random() < 0.2:
            src = rng.choice(sorted(world.tokens))
            m.fork(src, next_id)
            world.tokens[next_id] = list(world.tokens[src])
            pending[next_id] = list(pending[src])
            next_id += 1
        if len(world.tokens) > 4:
            victim = rng.choice(sorted(world.tokens))
            m.free_sequence(victim)
            del world.tokens[victim], pending[victim]
        batch = []
        for sid in sorted(world.tokens):
            p = pending[sid]
            if p:
                new = p[: rng.randint(1, len(p))]
            elif m.seq_len(sid) == 0:
                new = [rng.randrange(4)]
            else:
                new = [rng.randrange(4) for _ in range(rng.choice([0, 1, 1, 1, 2]))]
            pending[sid] = p[len(new):]
            batch.append((sid, new))
        run_step(m, world, pools, batch, give_tokens=rng.random() < 0.8)
        check_refcounts(m)
