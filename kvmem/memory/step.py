"""The memory tables of one forward step, built on the host once and shared by every memory layer.

``plan_memory_step`` applies the window rule chunk by chunk. A step adds ``q_lens[b]`` tokens to
row ``b`` (which held ``L0 = seq_lens_before[b]``); its queries are cut into *chunks* of
``chunk_size`` and each chunk into *sub-blocks* of ``block_size`` queries:

* chunk ``c`` starts at ``L_start = L0 + c * chunk_size``; before it, the whole blocks that left the
  window (``RowBanks.evict``: sinks never) join the row's bank, and its window starts at
  ``w0 = max(sink_blocks, (L_start - window) // block_size)``;
* every sub-block is one *segment* of the memory ops (its own entry of ``cu_seqlens_q``; the step's
  last ``block_size`` queries of each row are sub-blocks of their own, so the query that produces
  the next token selects with itself -- the first generated token's selection is the prompt's last
  query's): it shares
  its row's block table, bank (the first ``bank_len`` entries: a bank only grows) and its chunk's
  ``w0``, selects with its first query (never when the sub-block starts among the sinks: in a
  row's first chunk that leaves the sub-blocks past the sinks, which can select blocks of attached
  banks, ``kvmem.MemoryBank``) and attends causally up to its own last key (``seq_lens`` of the segment).
  The step's last ``block_size`` queries of each row are sub-blocks of one query each, so the end
  of a prompt (typically the question) selects token by token.

Segments are in token order (row after row, position ascending), so the step's ``q`` needs no
permutation; they are packed into *groups* of at most ``chunk_size`` tokens (at least one
segment): select and attend run once per group, which bounds their workspace by about
``chunk_size x (sinks + top_k * block_size + window + chunk_size)`` keys. Decode is the one-token
case (one segment per row). All the keys of a step are written before any chunk attends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from kvmem.memory.tables import RowBanks

__all__ = ["SegmentGroup", "MemoryStep", "plan_memory_step"]


@dataclass
class SegmentGroup:
    """Consecutive segments of a step, attended by one op call (device tensors, shapes ``[n]``).

    Attributes
    ----------
    tokens: ``(t0, t1)`` host ints, the group's token range in the step's ``q``
    rows: [n] int64 batch row of each segment
    cu_seqlens_q: [n + 1] int32, relative to ``t0``
    seq_lens: [n] int32, keys each segment attends up to (its last query's position + 1)
    window_start: [n] int32 (its chunk's ``w0``)
    bank_lens: [n] int32 (its chunk's bank length)
    query_index: [n] int32, relative to ``t0``; -1 = selects nothing
    num_selected: [n] int32, ``min(top_k, bank_len)`` or 0 (host-known: selection fills it)
    positions: [t1 - t0] int64 compacted RoPE position of each query (extend mode)
    max_seqlen_q: host int, the longest segment
    max_seqlen_k: host int, the longest *compacted* key count (sinks + selected + window keys), which
        bounds what memory attention reads and the RoPE positions it rotates at
    """

    tokens: tuple
    rows: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    window_start: torch.Tensor
    bank_lens: torch.Tensor
    query_index: torch.Tensor
    num_selected: torch.Tensor
    positions: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class MemoryStep:
    """One step's memory tables.

    Attributes
    ----------
    summarise: [E] int64 page ids to summarise before selecting (newly evicted blocks)
    bank_table: [batch, max_bank] int32 each row's bank after the step's evictions (-1 padded)
    groups: the segment groups, in token order
    last_segment: per row ``(group index, segment index in it)`` of its last sub-block, or None
    page_tables: per row the host block table (page ids, cache order) at plan time
    last_window_start: per row the ``w0`` of its last sub-block (host ints; 0 without queries)
    num_tokens: the step's query tokens
    """

    summarise: torch.Tensor
    bank_table: torch.Tensor
    groups: List[SegmentGroup]
    last_segment: List[Optional[tuple]]
    page_tables: List[List[int]] = field(default_factory=list)
    last_window_start: List[int] = field(default_factory=list)
    num_tokens: int = 0


def _i32(x, device):
    return torch.as_tensor(np.asarray(x, dtype=np.int32)).to(device)


def plan_memory_step(banks: RowBanks, page_tables: Sequence[Sequence[int]], seq_lens_before: Sequence[int],
                     q_lens: Sequence[int], *, top_k: int, chunk_size: int, device=None,
                     extra_summarise: Sequence[int] = (), bank_width: Optional[int] = None,
                     pad_summarise_to: Optional[int] = None) -> MemoryStep:
    """Evict (``banks`` changes) and build the step's tables (see the module docstring).

    Parameters
    ----------
    banks: the rows' ``RowBanks`` (``sink_blocks``, ``window``, ``block_size`` of the config)
    page_tables: per row, its block table's page ids (at least the blocks the step fills)
    seq_lens_before: per row, keys held before the step; q_lens: per row, new tokens
    top_k, chunk_size: of the resolved ``MemoryConfig``
    extra_summarise: page ids to summarise too (blocks of a step that did not complete)
    bank_width: fixed ``bank_table`` width (default: the longest bank, at least 1)
    pad_summarise_to: pad ``summarise`` with -1 (the summary pool's scratch row) to this length
        (static shapes: a decode step evicts at most one block per row)

    Raises
    ------
    ValueError: a bad argument (``banks`` is then unchanged: no block moved)
    """
    saved = banks.snapshot()
    try:
        return _plan(banks, page_tables, seq_lens_before, q_lens, top_k, chunk_size, device, extra_summarise,
                     bank_width, pad_summarise_to)
    except BaseException:
        banks.restore(saved)
        raise


def _plan(banks, page_tables, seq_lens_before, q_lens, top_k, chunk_size, device, extra_summarise, bank_width,
          pad_summarise_to) -> MemoryStep:
    bs, sink_blocks = banks.block_size, banks.sink_blocks
    segs = []  # (row, t_start, t_end, seq_len, w0, bank_len, in_window)
    evicted = [int(p) for p in extra_summarise]
    t = 0
    for b, (L0, n) in enumerate(zip(seq_lens_before, q_lens)):
        L0, n = int(L0), int(n)
        for c0 in range(0, n, chunk_size):
            start = L0 + c0
            evicted += banks.evict(b, page_tables[b], start)
            w0 = banks.window_start(b, start)
            bank_len = len(banks.pages[b])
            end = min(n, c0 + chunk_size)
            # the step's last block_size queries are sub-blocks of one query each: the prompt's tail
            # (the question) selects token by token, and the query that produces the next token
            # with itself (every sub-block still selects with its first query: causal)
            tail = max(c0, n - bs) if end == n else end
            cuts = list(range(c0, tail, bs)) + (list(range(tail, end)) if end == n else [])
            for s0, s1 in zip(cuts, cuts[1:] + [end]):
                # a sub-block selects when it starts past the sinks (its keys: sinks, selected, window
                # from w0): always once the row holds more than the sinks; in the row's first chunk only
                # attached banks' blocks can be selected (nothing has been evicted yet)
                segs.append((b, t + s0, t + s1, L0 + s1, w0, bank_len, w0 * bs <= L0 + s0))
        t += n
    num_tokens = t
    groups, last, last_w0 = [], [None] * len(q_lens), [0] * len(q_lens)
    i = 0
    while i < len(segs):
        j, t0 = i + 1, segs[i][1]
        while j < len(segs) and segs[j][2] - t0 <= chunk_size:
            j += 1
        part = segs[i:j]
        rows = [s[0] for s in part]
        q_len = np.asarray([s[2] - s[1] for s in part], dtype=np.int64)
        cu = np.zeros(len(part) + 1, dtype=np.int64)
        cu[1:] = np.cumsum(q_len)
        seq_lens = np.asarray([s[3] for s in part], dtype=np.int64)
        w0 = np.asarray([s[4] for s in part], dtype=np.int64)
        bank_lens = np.asarray([s[5] for s in part], dtype=np.int64)
        in_window = np.asarray([s[6] for s in part], dtype=bool)
        n_sel = np.where(in_window, np.minimum(bank_lens, top_k), 0)
        query_index = np.where(in_window & (q_len > 0), cu[:-1], -1)
        seg_of = np.repeat(np.arange(len(part)), q_len)
        original = np.arange(int(cu[-1])) - cu[:-1][seg_of] + (seq_lens - q_len)[seg_of]
        positions = original - ((w0 - sink_blocks - n_sel) * bs)[seg_of]
        dev = device
        groups.append(SegmentGroup(
            tokens=(t0, t0 + int(cu[-1])), rows=torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(dev),
            cu_seqlens_q=_i32(cu, dev), seq_lens=_i32(seq_lens, dev), window_start=_i32(w0, dev),
            bank_lens=_i32(bank_lens, dev), query_index=_i32(query_index, dev), num_selected=_i32(n_sel, dev),
            positions=torch.as_tensor(positions.astype(np.int64)).to(dev), max_seqlen_q=int(q_len.max()),
            max_seqlen_k=int((seq_lens - (w0 - sink_blocks - n_sel) * bs).max())))
        for k, s in enumerate(part):
            last[s[0]] = (len(groups) - 1, k)
            last_w0[s[0]] = s[4]
        i = j
    if pad_summarise_to is not None:
        if len(evicted) > pad_summarise_to:
            raise ValueError(f"plan_memory_step: argument 'pad_summarise_to' must be >= the step's {len(evicted)} "
                             f"evicted blocks, got {pad_summarise_to}")
        evicted += [-1] * (pad_summarise_to - len(evicted))
    width = bank_width if bank_width is not None else max(1, max((len(p) for p in banks.pages), default=0))
    return MemoryStep(summarise=torch.as_tensor(np.asarray(evicted, dtype=np.int64)).to(device),
                      bank_table=banks.bank_table(width=width, device=device), groups=groups, last_segment=last,
                      page_tables=[list(map(int, p)) for p in page_tables], last_window_start=last_w0,
                      num_tokens=num_tokens)
