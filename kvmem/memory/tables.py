"""Per-step memory tables (tensor in, tensor out, no host sync) and per-row bank bookkeeping.

One rule for prefill and decode: a step's ``window_start`` is fixed per row from the row's length
*before* the step, ``L_start``::

    w0 = max(sink_blocks, (L_start - window) // block_size)

Between steps, whole blocks ``[previous w0, new w0)`` leave the window for the row's bank (sink
blocks never do): their page ids move from the window to the bank list, no page is copied, and
they are summarised once.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

__all__ = ["window_start", "num_selected", "selection_query_index", "query_positions", "RowBanks"]


def window_start(seq_lens_before: torch.Tensor, *, sink_blocks: int, window: int, block_size: int) -> torch.Tensor:
    """``[batch]`` int32 first window block of each row for a step.

    seq_lens_before: [batch] int, each row's length before the step (``L_start``)
    """
    blocks = torch.div(seq_lens_before.long() - window, block_size, rounding_mode="floor")
    return blocks.clamp(min=sink_blocks).to(torch.int32)


def _starts_in_window(seq_lens_before, window_start_, block_size):
    return window_start_.long() * block_size <= seq_lens_before.long()


def num_selected(bank_lens: torch.Tensor, top_k: int, seq_lens_before: torch.Tensor, window_start_: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """``[batch]`` int32 blocks each row selects this step: ``min(top_k, bank_lens[b])``, or 0 when the
    row's queries start among the sinks (before its window: its first chunk)."""
    n = bank_lens.long().clamp(max=top_k)
    keep = _starts_in_window(seq_lens_before, window_start_, block_size)
    return torch.where(keep, n, torch.zeros_like(n)).to(torch.int32)


def selection_query_index(cu_seqlens_q: torch.Tensor, seq_lens_before: torch.Tensor, window_start_: torch.Tensor,
                          block_size: int) -> torch.Tensor:
    """``[batch]`` int32 ``query_index`` for ``memory_select``: each segment's first token, or -1 when the
    segment is empty or starts before the row's window (then nothing is selected)."""
    first, end = cu_seqlens_q[:-1].long(), cu_seqlens_q[1:].long()
    keep = (end > first) & _starts_in_window(seq_lens_before, window_start_, block_size)
    return torch.where(keep, first, torch.full_like(first, -1)).to(torch.int32)


def query_positions(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, window_start_: torch.Tensor,
                    n_selected: torch.Tensor, *, sink_blocks: int, block_size: int,
                    num_tokens: Optional[int] = None) -> torch.Tensor:
    """``[num_tokens]`` int64 compacted RoPE position of every query (extend mode).

    The query at original position ``p`` of row ``b`` sits at
    ``p - (window_start[b] - sink_blocks - n_selected[b]) * block_size``, right after the sinks,
    the selected blocks and the window keys before it.

    Parameters
    ----------
    seq_lens: [batch] int32, KV length after the step's write
    cu_seqlens_q: [batch + 1] int32
    window_start_: [batch] int32 (``window_start``); n_selected: [batch] int32 (``num_selected``)
    num_tokens: host int ``cu_seqlens_q[-1]`` (given, no device->host sync)
    """
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    if num_tokens is None:
        num_tokens = int(cu_seqlens_q[-1])
    batch = seq_lens.shape[0]
    row = torch.repeat_interleave(torch.arange(batch, device=seq_lens.device), q_lens, output_size=num_tokens)
    offset = torch.arange(num_tokens, device=seq_lens.device) - cu_seqlens_q[:-1].long()[row]
    original = seq_lens.long()[row] - q_lens[row] + offset
    shift = (window_start_.long() - sink_blocks - n_selected.long()) * block_size
    return original - shift[row]


class RowBanks:
    """Each row's bank between steps: page ids of its evicted blocks (and attached ones).

    Parameters
    ----------
    sink_blocks, window, block_size: the resolved ``MemoryConfig`` (window in tokens)
    batch: number of rows to start with

    A row's bank order is its ``bank_table`` order (the order selected blocks are placed in when
    compacted): attached pages first (documents precede the conversation), then its own evicted
    blocks in cache order.
    """

    def __init__(self, *, sink_blocks: int, window: int, block_size: int, batch: int = 0):
        self.sink_blocks, self.window, self.block_size = sink_blocks, window, block_size
        self.pages: List[List[int]] = []
        self.banked_until: List[int] = []  # first block-table column not yet banked, per row
        for _ in range(batch):
            self.add_row()

    def __len__(self) -> int:
        return len(self.pages)

    def add_row(self, attached: Iterable[int] = ()) -> int:
        """A new row (empty bank unless ``attached`` pages are given); returns its index."""
        self.pages.append([int(p) for p in attached])
        self.banked_until.append(self.sink_blocks)
        return len(self.pages) - 1

    def remove_row(self, row: int) -> List[int]:
        """Forget a finished row; returns its bank's page ids (the caller frees its own)."""
        self.banked_until.pop(row)
        return self.pages.pop(row)

    def attach(self, row: int, page_ids: Iterable[int]) -> None:
        """Put pages (e.g. a document bank's) in front of the row's bank."""
        self.pages[row][:0] = [int(p) for p in page_ids]

    def snapshot(self):
        """The rows' state (pages, banked columns), for ``restore``: a step that fails half-way
        leaves the banks as they were."""
        return [list(p) for p in self.pages], list(self.banked_until)

    def restore(self, state) -> None:
        pages, banked_until = state
        self.pages, self.banked_until = [list(p) for p in pages], list(banked_until)

    def window_start(self, row: int, seq_len_before: int) -> int:
        return max(self.sink_blocks, (seq_len_before - self.window) // self.block_size)

    def evict(self, row: int, block_table_row: Sequence[int], seq_len_before: int) -> List[int]:
        """Before a step of a row that has ``seq_len_before`` keys: bank the whole blocks that left the
        window, ``block_table_row[banked_until : w0]``, and return their page ids (to summarise)."""
        w0 = self.window_start(row, seq_len_before)
        start = self.banked_until[row]
        if w0 <= start:
            return []
        moved = [int(p) for p in block_table_row[start:w0]]
        if any(p < 0 for p in moved):
            raise ValueError(f"RowBanks.evict: argument 'block_table_row' must hold page ids in columns "
                             f"[{start}, {w0}) of row {row}, got {moved}")
        self.pages[row].extend(moved)
        self.banked_until[row] = w0
        return moved

    def retain(self, keep: Sequence[Sequence[int]]) -> List[List[int]]:
        """An eviction policy's verdict: row ``b`` keeps only the bank positions ``keep[b]``; returns
        each row's dropped page ids. A dropped block leaves the bank for good (``banked_until`` does
        not move back); its page stays in the row's block table (it is not freed)."""
        if len(keep) != len(self.pages):
            raise ValueError(f"RowBanks.retain: argument 'keep' must have one entry per row ({len(self.pages)}), "
                             f"got {len(keep)}")
        wanted = [sorted(set(int(j) for j in positions)) for positions in keep]
        for b, w in enumerate(wanted):  # every row checked before any changes
            if w and (w[0] < 0 or w[-1] >= len(self.pages[b])):
                raise ValueError(f"RowBanks.retain: argument 'keep' of row {b} must hold positions in "
                                 f"[0, {len(self.pages[b])}), got {w}")
        dropped = []
        for b, w in enumerate(wanted):
            pages, kept = self.pages[b], set(w)
            dropped.append([p for j, p in enumerate(pages) if j not in kept])
            self.pages[b] = [pages[j] for j in w]
        return dropped

    def bank_lens(self, device=None) -> torch.Tensor:
        """``[batch]`` int32."""
        return torch.tensor([len(p) for p in self.pages], dtype=torch.int32, device=device)

    def bank_table(self, width: Optional[int] = None, device=None) -> torch.Tensor:
        """``[batch, width]`` int32 page ids, -1 padded (``width`` fixed for static shapes; default the
        longest bank)."""
        longest = max((len(p) for p in self.pages), default=0)
        width = longest if width is None else width
        if width < longest:
            raise ValueError(f"RowBanks.bank_table: argument 'width' must be >= the longest bank ({longest}), got {width}")
        table = torch.full((len(self.pages), width), -1, dtype=torch.int32)
        for b, pages in enumerate(self.pages):
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table.to(device) if device is not None else table
