"""BlockAllocator: free list, refcounts, double free, prefix-cache hashes and LRU eviction."""

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmem.cache import BlockAllocator, CacheFullError, block_hashes, hash_block_tokens


def test_allocate_free_counts():
    a = BlockAllocator(8, 4)
    assert a.num_free == 8 and a.num_used == 0
    got = a.allocate(3)
    assert len(set(got)) == 3 and all(0 <= b < 8 for b in got)
    assert a.num_free == 5 and all(a.refcount(b) == 1 for b in got)
    a.incref(got[:1])
    a.free(got)
    assert a.num_free == 7 and a.refcount(got[0]) == 1
    a.free(got[:1])
    assert a.num_free == 8
    a.check_invariants()


def test_allocate_zero_and_bad_args():
    a = BlockAllocator(2, 1)
    assert a.allocate(0) == []
    with pytest.raises(ValueError):
        a.allocate(-1)
    with pytest.raises(TypeError):
        a.allocate(1.5)
    with pytest.raises(ValueError):
        BlockAllocator(0, 4)
    with pytest.raises(ValueError):
        a.free([7])
    with pytest.raises(ValueError):
        a.refcount(-1)


def test_cache_full_leaves_state_unchanged():
    a = BlockAllocator(4, 2)
    a.allocate(3)
    before = a.debug_state()
    with pytest.raises(CacheFullError) as ei:
        a.allocate(2)
    err = ei.value
    assert isinstance(err, RuntimeError)
    assert (err.blocks_needed, err.blocks_free) == (2, 1)
    assert "num_blocks=" in str(err)
    assert a.debug_state() == before
    again = pickle.loads(pickle.dumps(err))
    assert (again.blocks_needed, again.blocks_free, str(again)) == (2, 1, str(err))


def test_double_free_names_block_and_changes_nothing():
    a = BlockAllocator(4, 2)
    b0, b1 = a.allocate(2)
    a.free([b0])
    before = a.debug_state()
    with pytest.raises(ValueError, match=f"double free of block {b0}"):
        a.free([b1, b0])
    assert a.debug_state() == before
    with pytest.raises(ValueError, match=f"double free of block {b1}"):
        a.free([b1, b1])
    assert a.debug_state() == before


def test_incref_of_free_uncached_block_is_rejected():
    a = BlockAllocator(2, 2)
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(ValueError, match="free"):
        a.incref([b])


def test_hash_chain_depends_on_whole_prefix():
    h = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(h) == 3  # the trailing partial block has no hash
    assert h == block_hashes([1, 2, 3, 4, 5, 6], 2)
    assert h[1] != hash_block_tokens(None, [3, 4])  # same tokens, different parent
    assert block_hashes([9, 9, 3, 4], 2)[1] != h[1]
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, parent=h[1], start_block=2) == [h[2]]
    with pytest.raises(ValueError):
        hash_block_tokens(None, [2**70])


def test_prefix_cache_register_reuse_and_lru_eviction():
    a = BlockAllocator(4, 2)
    blocks = a.allocate(3)
    hashes = block_hashes(list(range(6)), 2)
    for b, h in zip(blocks, hashes):
        assert a.register(b, h)
    assert not a.register(blocks[0], hashes[1])  # first registration wins
    assert a.match_prefix(hashes) == blocks
    a.free(blocks)  # freed in order 0, 1, 2: block 0 is least recently freed
    assert a.num_free == 4 and a.num_cached_free == 3
    assert a.match_prefix(hashes) == blocks  # still reusable at refcount 0
    a.incref(blocks[:1])  # reuse takes a cached free block back
    assert a.refcount(blocks[0]) == 1 and a.num_free == 3
    a.free(blocks[:1])  # now block 0 is the most recently freed
    # Plain free blocks go first, then LRU eviction: blocks[1] is evicted before blocks[2], blocks[0].
    (plain,) = a.allocate(1)
    assert plain not in blocks
    (evicted,) = a.allocate(1)
    assert evicted == blocks[1] and a.block_hash(evicted) is None
    assert a.lookup(hashes[1]) is None and a.match_prefix(hashes) == blocks[:1]
    a.check_invariants()


def test_unregister_and_reset():
    a = BlockAllocator(3, 2)
    b0, b1 = a.allocate(2)
    a.register(b0, b"x")
    a.register(b1, b"y")
    a.free([b0, b1])
    a.unregister(b0)
    assert a.lookup(b"x") is None and a.num_cached_free == 1 and a.num_free == 3
    a.reset_prefix_cache()
    assert a.num_cached == 0 and a.num_free == 3
    a.check_invariants()
    with pytest.raises(ValueError):
        a.register(b0, b"z")  # free blocks cannot be registered


@given(st.integers(1, 6), st.lists(st.integers(0, 3), max_size=30))
@settings(max_examples=200, deadline=None)
def test_block_hashes_prefix_property(bs, tokens):
    full = block_hashes(tokens, bs)
    for cut in range(0, len(tokens) + 1):
        assert block_hashes(tokens[:cut], bs) == full[: cut // bs]


class AllocatorMachine(RuleBasedStateMachine):
    """Random op sequences against a model: dict of held references."""

    def __init__(self):
        super().__init__()
        self.n = 6
        self.a = BlockAllocator(self.n, 2)
        self.refs = {}  # block -> number of references the model holds
        self.hashed = {}  # hash -> block (model of the prefix cache)

    @rule(k=st.integers(0, 8))
    def allocate(self, k):
        free_before = self.a.num_free
        if k > free_before:
            before = self.a.debug_state()
            with pytest.raises(CacheFullError) as ei:
                self.a.allocate(k)
            assert (ei.value.blocks_needed, ei.value.blocks_free) == (k, free_before)
            assert self.a.debug_state() == before
            return
        got = self.a.allocate(k)
        assert len(set(got)) == k
        for b in got:
            assert self.refs.get(b, 0) == 0, "allocated a block that is still referenced"
            self.refs[b] = 1
            for h in [h for h, hb in self.hashed.items() if hb == b]:
                del self.hashed[h]  # eviction dropped its hash

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def incref(self, data):
        b = data.draw(st.sampled_from(sorted(b for b, r in self.refs.items() if r)))
        self.a.incref([b])
        self.refs[b] += 1

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def free(self, data):
        b = data.draw(st.sampled_from(sorted(b for b, r in self.refs.items() if r)))
        self.a.free([b])
        self.refs[b] -= 1

    @rule(b=st.integers(0, 5))
    def double_free_rejected(self, b):
        if self.refs.get(b, 0) == 0:
            before = self.a.debug_state()
            with pytest.raises(ValueError, match=f"block {b}"):
                self.a.free([b])
            assert self.a.debug_state() == before

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data(), h=st.binary(min_size=1, max_size=1))
    def register(self, data, h):
        b = data.draw(st.sampled_from(sorted(b for b, r in self.refs.items() if r)))
        ok = self.a.register(b, h)
        assert ok == (h not in self.hashed and b not in self.hashed.values())
        if ok:
            self.hashed[h] = b

    @rule(h=st.binary(min_size=1, max_size=1))
    def reuse(self, h):
        b = self.a.lookup(h)
        assert b == self.hashed.get(h)
        if b is not None:
            self.a.incref([b])
            self.refs[b] = self.refs.get(b, 0) + 1

    @invariant()
    def consistent(self):
        self.a.check_invariants()
        used = sum(1 for r in self.refs.values() if r)
        assert self.a.num_used == used and self.a.num_free + used == self.n
        for b in range(self.n):
            assert self.a.refcount(b) == self.refs.get(b, 0)
        for h, b in self.hashed.items():
            assert self.a.lookup(h) == b

    def teardown(self):
        for b, r in self.refs.items():
            if r:
                self.a.free([b] * r)
        assert self.a.num_free == self.n


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
