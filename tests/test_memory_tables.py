"""Per-step memory tables and RowBanks, and the whole step loop (evict, summarise, select, attend)."""

import math

import pytest
import torch

from kvmem.memory import RowBanks, num_selected, query_positions, selection_query_index, window_start
from kvmem.memory.summaries import empty_summaries, write_summaries
from kvmem.ops import reference
from kvmem.ops.memory_attention import memory_attention
from kvmem.ops.memory_select import memory_select
from memory_cases import rope_table

BS, SINK_BLOCKS, WINDOW = 16, 1, 32
HQ, HKV, D = 6, 2, 64


def test_window_start_rule():
    before = torch.tensor([0, 15, 47, 48, 63, 64, 200], dtype=torch.int32)
    w0 = window_start(before, sink_blocks=1, window=32, block_size=16)
    assert w0.dtype == torch.int32
    assert w0.tolist() == [max(1, (n - 32) // 16) for n in before.tolist()] == [1, 1, 1, 1, 1, 2, 10]
    n = num_selected(torch.tensor([3, 0, 9], dtype=torch.int32), 4, torch.tensor([5, 80, 300]),
                     torch.tensor([1, 3, 16], dtype=torch.int32), 16)
    assert n.tolist() == [0, 0, 4]  # row 0 starts among its sinks: no selection
    index = selection_query_index(torch.tensor([0, 2, 2, 5], dtype=torch.int32), torch.tensor([5, 80, 300]),
                                  torch.tensor([1, 3, 16], dtype=torch.int32), 16)
    assert index.tolist() == [-1, -1, 2]


def test_query_positions_keep_window_distances():
    seq_lens = torch.tensor([100, 37, 5], dtype=torch.int32)
    cu = torch.tensor([0, 1, 6, 11], dtype=torch.int32)
    w0 = torch.tensor([4, 1, 1], dtype=torch.int32)
    n_sel = torch.tensor([2, 0, 0], dtype=torch.int32)
    pos = query_positions(seq_lens, cu, w0, n_sel, sink_blocks=1, block_size=16)
    # Row 0: p = 99 -> 99 - (4 - 1 - 2) * 16; rows 1 and 2 have no bank: original positions.
    assert pos.tolist() == [99 - 16, 32, 33, 34, 35, 36, 0, 1, 2, 3, 4]
    assert torch.equal(query_positions(seq_lens, cu, w0, n_sel, sink_blocks=1, block_size=16, num_tokens=11), pos)


def test_row_banks_bookkeeping():
    banks = RowBanks(sink_blocks=1, window=32, block_size=16, batch=2)
    table = [10, 11, 12, 13, 14, 15, 16]
    assert banks.evict(0, table, 40) == []  # w0 = max(1, 0)
    assert banks.evict(0, table, 64) == [11]  # w0 = 2: block 1 leaves; sink block 0 never
    assert banks.evict(0, table, 70) == []
    assert banks.evict(0, table, 100) == [12, 13]  # w0 = 4
    banks.attach(1, [99, 98])
    assert banks.evict(1, [20, 21, 22], 48) == []
    assert banks.bank_lens().tolist() == [3, 2]
    assert banks.bank_table(width=4).tolist() == [[11, 12, 13, -1], [99, 98, -1, -1]]
    banks.attach(0, [7])
    assert banks.pages[0] == [7, 11, 12, 13]
    assert banks.add_row() == 2 and banks.remove_row(0) == [7, 11, 12, 13] and len(banks) == 2
    with pytest.raises(ValueError, match="'width'"):
        banks.bank_table(width=1)
    with pytest.raises(ValueError, match="'block_table_row'"):
        banks.evict(0, [20, -1, -1, -1], 100)



@pytest.mark.parametrize("bad", ["bank_width", "pad_summarise_to", "page_id"])
def test_a_failed_step_plan_leaves_the_banks_unchanged(bad):
    """plan_memory_step evicts while it plans; an argument it rejects afterwards (a too narrow bank
    table, too short a summarise pad, a missing page id of a later row) must not leave blocks banked
    that were never summarised: the banks are as before, and the retried plan summarises them."""
    from kvmem.memory.step import plan_memory_step

    banks = RowBanks(sink_blocks=1, window=32, block_size=16, batch=2)
    tables = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]]
    kw = dict(top_k=2, chunk_size=16)
    plan_memory_step(banks, tables, [40, 40], [1, 1], **kw)
    before = banks.snapshot()
    bad_tables = [tables[0], [20, -1, -1, -1, 24, 25, 26]] if bad == "page_id" else tables
    bad_kw = {"bank_width": {"bank_width": 1}, "pad_summarise_to": {"pad_summarise_to": 1}, "page_id": {}}[bad]
    with pytest.raises(ValueError, match={"bank_width": "'width'", "pad_summarise_to": "'pad_summarise_to'",
                                          "page_id": "'block_table_row'"}[bad]):
        plan_memory_step(banks, bad_tables, [100, 100], [1, 1], **kw, **bad_kw)
    assert banks.snapshot() == before
    ms = plan_memory_step(banks, tables, [100, 100], [1, 1], **kw)
    assert sorted(ms.summarise.tolist()) == [11, 12, 13, 21, 22, 23]  # every banked block is summarised

class StepLoop:
    """A batch through chunked prefill and decode with the memory stages, beside full attention."""

    def __init__(self, prompt_lens, *, top_k, extend, seed=0, max_len=160, row_ids=None):
        g = torch.Generator().manual_seed(seed)
        row_ids = range(len(prompt_lens)) if row_ids is None else row_ids
        self.row_data = [torch.Generator().manual_seed(1000 * seed + r) for r in row_ids]  # per-row token data
        self.top_k, self.extend = top_k, extend
        self.batch = len(prompt_lens)
        blocks_per_row = -(-max_len // BS)
        num_blocks = self.batch * blocks_per_row + 2
        self.k_cache = torch.full((num_blocks, BS, HKV, D), math.nan)
        self.v_cache = torch.full((num_blocks, BS, HKV, D), math.nan)
        pages = torch.randperm(num_blocks, generator=g)[: self.batch * blocks_per_row]
        self.block_table = pages.view(self.batch, blocks_per_row).to(torch.int32)
        self.summaries = empty_summaries(num_blocks, HKV, D)
        self.banks = RowBanks(sink_blocks=SINK_BLOCKS, window=WINDOW, block_size=BS, batch=self.batch)
        self.lens = [0] * self.batch
        self.rope = rope_table(max_len + 1, D) if extend else None
        self.bank_width = blocks_per_row

    def step(self, q_lens):
        """Write ``q_lens[b]`` new tokens per row and attend; returns (memory out, full-attention out)."""
        before = torch.tensor(self.lens, dtype=torch.int32)
        for b in range(self.batch):  # between steps: evict + summarise
            moved = self.banks.evict(b, self.block_table[b].tolist(), self.lens[b])
            write_summaries(self.summaries, self.k_cache, torch.tensor(moved, dtype=torch.long))
        k, v, q_pre = [], [], []
        for b, n in enumerate(q_lens):
            if n:
                g = self.row_data[b]
                k.append(torch.randn(n, HKV, D, generator=g))
                v.append(torch.randn(n, HKV, D, generator=g))
                q_pre.append(torch.randn(n, HQ, D, generator=g))
        k, v, q_pre = torch.cat(k), torch.cat(v), torch.cat(q_pre)
        slots = [int(self.block_table[b, p // BS]) * BS + p % BS
                 for b in range(self.batch) for p in range(self.lens[b], self.lens[b] + q_lens[b])]
        reference.cache_write(k, v, self.k_cache, self.v_cache, torch.tensor(slots, dtype=torch.long))
        self.lens = [n + q for n, q in zip(self.lens, q_lens)]
        seq_lens = torch.tensor(self.lens, dtype=torch.int32)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        w0 = window_start(before, sink_blocks=SINK_BLOCKS, window=WINDOW, block_size=BS)
        bank_table, bank_lens = self.banks.bank_table(width=self.bank_width), self.banks.bank_lens()
        original = query_positions(seq_lens, cu, w0, w0 - SINK_BLOCKS, sink_blocks=SINK_BLOCKS, block_size=BS)  # no shift
        q_orig = reference.apply_rotary(q_pre, self.rope, original) if self.extend else q_pre
        # Exact mode selects with the cached (post-RoPE) keys' query; extend mode with pre-RoPE q.
        selected = memory_select(q_pre if self.extend else q_orig, self.summaries, bank_table, bank_lens, cu,
                                 self.top_k, query_index=selection_query_index(cu, before, w0, BS))
        n_sel = num_selected(bank_lens, self.top_k, before, w0, BS)
        assert torch.equal((selected >= 0).sum(-1).to(torch.int32), n_sel[:, None].expand(-1, HKV))
        rope_kw = {}
        q = q_orig
        if self.extend:
            compacted = query_positions(seq_lens, cu, w0, n_sel, sink_blocks=SINK_BLOCKS, block_size=BS)
            q = reference.apply_rotary(q_pre, self.rope, compacted)
            rope_kw = dict(rope_cos_sin=self.rope)
        args = (self.k_cache, self.v_cache, self.block_table, seq_lens, cu, max(q_lens), max(self.lens))
        out = memory_attention(q, *args, sink_blocks=SINK_BLOCKS, window_start=w0, bank_table=bank_table,
                               selected=selected, **rope_kw)
        full, _ = reference.paged_attention(q_orig, *args, scale=1 / math.sqrt(D), **rope_kw)
        return out, full, cu


def _run(loop, chunk, prompt_lens, decode_steps=4):
    """Chunked prefill then decode; returns [(out, full, cu_seqlens_q)] per step."""
    outs = []
    remaining = list(prompt_lens)
    while any(remaining):
        q_lens = [min(chunk, r) for r in remaining]
        remaining = [r - q for r, q in zip(remaining, q_lens)]
        outs.append(loop.step(q_lens))
    for _ in range(decode_steps):
        outs.append(loop.step([1] * len(prompt_lens)))
    return outs


def _row_segments(outs, row):
    """Row ``row``'s non-empty output segments, step by step."""
    segments = []
    for out, _, cu in outs:
        lo, hi = int(cu[row]), int(cu[row + 1])
        if hi > lo:
            segments.append(out[lo:hi])
    return segments


@pytest.mark.parametrize("extend", [False, True], ids=["exact", "extend"])
@pytest.mark.parametrize("chunk", [8, 24])
def test_step_loop_with_top_k_covering_the_bank_is_full_attention(extend, chunk):
    """Eviction, summaries, selection and attention over many steps: with top_k covering the bank
    the chunk size changes nothing and every step equals full attention (extend: compaction is
    the identity, so RoPE at original positions)."""
    prompts = [70, 45, 9]
    loop = StepLoop(prompts, top_k=16, extend=extend, seed=chunk)
    for out, full, _ in _run(loop, chunk, prompts):
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert loop.banks.bank_lens().tolist() == [max(0, (n - 1 - WINDOW) // BS - SINK_BLOCKS) for n in loop.lens]


@pytest.mark.parametrize("extend", [False, True], ids=["exact", "extend"])
def test_ragged_batch_equals_rows_one_at_a_time(extend):
    """Small top_k (selection prunes): each row of a ragged batch gives what it gives alone, on
    other pages (the batch's rows finish prefill at different steps)."""
    prompts, chunk = [120, 40, 17], 16
    batch_loop = StepLoop(prompts, top_k=1, extend=extend, seed=1)
    together = _run(batch_loop, chunk, prompts, decode_steps=3)
    assert batch_loop.banks.bank_lens().tolist() == [4, 0, 0]  # row 0 selects 1 of 4
    for b, n in enumerate(prompts):
        alone = _run(StepLoop([n], top_k=1, extend=extend, seed=1, row_ids=[b]), chunk, [n], decode_steps=3)
        got, want = _row_segments(together, b), _row_segments(alone, 0)
        assert len(got) == len(want) == -(-n // chunk) + 3
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
