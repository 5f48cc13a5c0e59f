"""When a ``PagedKVCache`` decode step runs shared-prefix (cascade) decode (``kvmem.ops.cascade``).

Decided on the host, once per eager decode step, from the rows' block tables (host lists: no device
sync), for each full-attention layer group: if every row of the batch starts with the same page ids
(``prefix_cache=True`` hands the cached blocks of a shared prompt prefix to every row that has it;
forked rows and rows deduplicated at plan time share pages the same way) and they are worth it, the
group's ``StepMetadata.cascade`` gets a ``CascadePlan``; ``kvmem.layer.attend`` then runs
``cascade_decode`` for the group's layers.

The rule (``kvmem.patch(model, cascade=...)``: ``"auto"``, True = on, False = off; left at None it
is the environment's ``KVMEM_CASCADE``, read at each step, default ``auto``):

* ``auto`` (default): at least 2 rows, at least ``MIN_SHARED_BLOCKS`` = 2 shared pages, and the
  shared tokens at least ``MIN_SHARED_FRACTION`` = 25 % of the longest row. Below that the shared
  part saves little reading and the extra call and merge cost more (measured: ``benchmarks/
  bench_cascade.py``; the saving grows with rows x shared tokens).
* ``1`` / ``on``: whenever at least 2 rows share at least one full page (tests, benchmarks).
* ``0`` / ``off``: never (plain decode, the same numbers to fp32 rounding).

Only *all* rows sharing counts (rows with different prefixes: plain decode; grouping rows by prefix
is not done). Shared pages are leading pages that are full before the step's write and identical in
every row. Not used: for sliding-window groups (a window does not see the whole prefix), for memory-
bank caches (their own attention), for prefill / multi-token steps, and for static decode steps
(``static_decode_step``, CUDA graphs / ``compile_decode``: fixed-shape metadata, plain decode).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from kvmem.ops.cascade import shared_prefix_blocks, split_tables

__all__ = ["MIN_SHARED_BLOCKS", "MIN_SHARED_FRACTION", "mode", "option", "plan_step"]

MIN_SHARED_BLOCKS = 2
MIN_SHARED_FRACTION = 0.25
_MODES = {"": "auto", "auto": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}


def mode() -> str:
    """``KVMEM_CASCADE`` as ``"auto"``, ``"on"`` or ``"off"`` (ValueError for anything else)."""
    raw = os.environ.get("KVMEM_CASCADE", "").strip().lower()
    if raw not in _MODES:
        raise ValueError(f"KVMEM_CASCADE must be one of auto, 1/on, 0/off; got {raw!r}")
    return _MODES[raw]


def option(value):
    """``kvmem.patch``'s ``cascade=`` as ``None`` (follow ``KVMEM_CASCADE``), ``"auto"``, ``"on"`` or
    ``"off"``; anything else raises a ``ValueError`` naming the argument."""
    if value is None:
        return None
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in _MODES and value.strip():
        return _MODES[value.strip().lower()]
    raise ValueError(f"kvmem.patch: cascade must be None (KVMEM_CASCADE), True, False or 'auto'; got {value!r}")


def worth_it(num_shared: int, rows: int, block_size: int, longest: int, how: str) -> bool:
    """The rule of the module docstring for ``num_shared`` shared pages."""
    if how == "off" or rows < 2 or num_shared < 1:
        return False
    if how == "on":
        return True
    return num_shared >= MIN_SHARED_BLOCKS and num_shared * block_size >= MIN_SHARED_FRACTION * longest


def plan_step(manager, groups, seq_ids: Sequence, plan, prev: List[int], nums: List[int],
              how: Optional[str] = None) -> None:
    """Set ``plan.groups[g].cascade`` for the full-attention groups of a one-token-per-row step
    whose rows share enough leading pages (host work only: the tables are host lists). ``how``:
    ``"auto"`` / ``"on"`` / ``"off"`` (``option``), None = ``mode()``."""
    how = mode() if how is None else how
    rows = len(seq_ids)
    if how == "off" or rows < 2 or any(n != 1 for n in nums):
        return
    bs = manager.block_size
    full_blocks = min(prev) // bs  # pages full before this step's write
    for g in groups:
        if g.window is not None:
            continue
        md = plan.groups[g.name]
        if md.block_table.shape[0] != rows:  # padded rows: not this path
            continue
        tables = [manager.block_table(s, g.name) for s in seq_ids]
        n = shared_prefix_blocks(tables, full_blocks)
        if worth_it(n, rows, bs, md.max_seqlen_k, how):
            md.cascade = split_tables(md.block_table, md.seq_lens, n, bs, md.max_seqlen_k)
