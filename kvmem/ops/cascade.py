"""Shared-prefix (cascade) decode: rows that share their first pages read them once per step.

When the rows of a decode step start with the same pages (a prompt prefix reused from the prefix
cache, beams, rows deduplicated at plan time), attention over each row's keys splits exactly in
two disjoint key sets, merged with ``merge_states`` (the same identity split-K uses)::

    keys of row b = shared prefix (P pages, the same ids in every row) + its own suffix
    (a) shared: ONE query segment of all B decode queries over the P shared pages, causal=False
        (every decode query sits after the prefix, so it sees all of it) -> out_a, lse_a
    (b) suffix: the plain paged decode of each row over its own pages       -> out_b, lse_b
    (c) merge_states(out_a, lse_a, out_b, lse_b)

No new kernel: (a) and (b) are ``paged_attention`` work, dispatched (and falling back) like any
other call, and (a) reads each shared page once for the batch: on the C++ CPU backend the B * G
query rows of a KV head take the kernel's wide path (a small GEMM per key tile) instead of B
separate streams over the same pages. (b) is a second call (on a GPU: the decode kernel).
The plan also lays both parts out for one call over ``[q; q]`` (``run(..., fuse=True)``; it
measured no faster on CPU). Cost over the prefix (L tokens): plain decode reads
``2 * B * L * Hkv * D`` cache elements (bandwidth-bound), (a) does ``4 * B * Hq * L * D`` flops once the pages are read (compute-bound),
so the step speeds up by about ``F * elem_bytes * Hkv / (2 * Hq * BW)`` (F: the kernel's flop rate
on the wide path, BW: read bandwidth in bytes/s); for fp32 and 32/8 heads ``F / (2 * BW)``
(measured: ``benchmarks/bench_cascade.py``, ``benchmarks/RESULTS.md``).

How the features compose (the spec, ``kvmem.ops.spec``, is the judge):

* ``softcap`` is elementwise on each score: applied in both parts.
* ``sink_logits`` is one extra term of the softmax denominator: it goes into part (a) only (which
  always has keys), so that it is counted once; ``merge_states`` then adds the denominators.
* ``k_scale``/``v_scale`` (float8 caches): per KV head, the same in both parts.
* ``rope_cos_sin`` (RoPE on load): the suffix's key ``j`` sits at position ``shared_len + j``, so
  part (b) reads the table from row ``shared_len`` on (a view, no copy).
* A sliding window is not supported (a windowed row does not see its whole prefix): callers use
  plain decode for sliding-window layers.

This is a composite of public ops, not a ``torch.library`` op of its own: each part is a custom
op, so ``torch.compile`` traces it as its attention call(s) and a merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from kvmem.ops._validate import fail, host_int, tensor
from kvmem.ops.merge_states import merge_states as _merge_states
from kvmem.ops.paged_attention import paged_attention as _paged_attention

__all__ = ["CascadePlan", "cascade_decode", "plan_cascade", "split_tables", "shared_prefix_blocks", "run"]

OP = "cascade_decode"


@dataclass(frozen=True)
class CascadePlan:
    """One decode step's keys split into a shared prefix and each row's own suffix (build it with
    :func:`plan_cascade` or :func:`split_tables`; once per step, reused by every layer).

    Row 0 of the tables is the shared prefix (one query segment of all ``rows`` decode queries),
    rows ``1 ..`` are the rows' suffixes (one decode query each), so that the two parts can run as
    one ``paged_attention`` call over ``[q; q]`` (:func:`run`'s fused form) or as two (views).

    Attributes
    ----------
    block_table: [rows + 1, max_blocks] int32: row 0 the shared page ids, row ``1 + b`` row ``b``'s
        pages after the shared ones
    seq_lens: [rows + 1] int32: ``shared_len``, then each row's suffix length (0 allowed)
    cu_seqlens_q: [rows + 2] int32: ``0, rows, rows + 1, .., 2 * rows`` (over ``[q; q]``)
    suffix_cu: [rows + 1] int32: ``0, 1, .., rows`` (the suffix part alone, over ``q``)
    rows, shared_len, num_shared_blocks: host ints (``shared_len = num_shared_blocks * block_size``)
    max_suffix_len: host int, >= every suffix length
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    suffix_cu: torch.Tensor
    rows: int
    shared_len: int
    num_shared_blocks: int
    max_suffix_len: int

    # the two parts as views (two-call form)
    @property
    def shared_table(self) -> torch.Tensor:
        return self.block_table[:1, : self.num_shared_blocks]

    @property
    def shared_lens(self) -> torch.Tensor:
        return self.seq_lens[:1]

    @property
    def shared_cu(self) -> torch.Tensor:
        return self.cu_seqlens_q[:2]

    @property
    def suffix_table(self) -> torch.Tensor:
        return self.block_table[1:]

    @property
    def suffix_lens(self) -> torch.Tensor:
        return self.seq_lens[1:]

    def to(self, device) -> "CascadePlan":
        """The same plan on ``device`` (self when already there; copies are non-blocking)."""
        device = torch.device(device)
        if self.block_table.device == device:
            return self
        mv = [t.to(device, non_blocking=True) for t in (self.block_table, self.seq_lens, self.cu_seqlens_q,
                                                         self.suffix_cu)]
        return CascadePlan(*mv, self.rows, self.shared_len, self.num_shared_blocks, self.max_suffix_len)


def _host_ints(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def plan_cascade(shared_blocks: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 max_seqlen_k: int, block_size: int) -> CascadePlan:
    """A plan from the shared page ids ``[P]`` and the rows' suffix tables ``[rows, W]`` / lengths
    ``[rows]`` (see :func:`cascade_decode`): device copies, no host sync."""
    rows, device = block_table.shape[0], block_table.device
    P, W = shared_blocks.shape[0], block_table.shape[1]
    table = torch.full((rows + 1, max(P, W)), -1, dtype=torch.int32, device=device)
    table[0, :P] = shared_blocks
    table[1:, :W] = block_table
    shared_len = P * block_size
    lens = torch.cat([_host_ints([shared_len], device), seq_lens.to(torch.int32)])
    cu = _host_ints([0] + list(range(rows, 2 * rows + 1)), device)
    return CascadePlan(table, lens, cu, _host_ints(list(range(rows + 1)), device), rows, shared_len, P,
                       int(max_seqlen_k))


def split_tables(block_table: torch.Tensor, seq_lens: torch.Tensor, num_shared_blocks: int, block_size: int,
                 max_seqlen_k: int) -> CascadePlan:
    """A plan from full block tables whose first ``num_shared_blocks`` columns hold the same page
    ids in every row (the caller knows it: ``shared_prefix_blocks`` of the host tables). Device
    copies, no host sync.

    Parameters
    ----------
    block_table: [rows, max_blocks] int32, every row's full table
    seq_lens: [rows] int32, every row's full KV length (each >= ``num_shared_blocks * block_size``)
    max_seqlen_k: host int, >= the longest ``seq_lens`` entry
    """
    P = int(num_shared_blocks)
    shared_len = P * block_size
    return plan_cascade(block_table[0, :P], block_table[:, P:], seq_lens - shared_len,
                        max(0, int(max_seqlen_k) - shared_len), block_size)


def shared_prefix_blocks(tables: Sequence[Sequence[int]], full_blocks: int) -> int:
    """How many leading pages every row's (host) block table shares, counting only pages that are
    full in every row (``full_blocks``: e.g. ``min(seq_lens) // block_size`` before the step's
    write) and live (>= 0). One vectorised pass (host lists in, no device work)."""
    if not tables:
        return 0
    n = min([int(full_blocks)] + [len(t) for t in tables])
    if n <= 0:
        return 0
    a = np.asarray([t[:n] for t in tables], dtype=np.int64)  # [rows, n]
    ok = (a == a[0]).all(axis=0) & (a[0] >= 0)
    return n if ok.all() else int(np.argmin(ok))


def run(paged_attention: Callable, merge_states: Callable, q: torch.Tensor, k_cache: torch.Tensor,
        v_cache: torch.Tensor, plan: CascadePlan, *, scale: float, softcap: Optional[float] = None,
        sink_logits: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
        v_scale: Optional[torch.Tensor] = None, rope_cos_sin: Optional[torch.Tensor] = None,
        rope_neox: bool = True, fuse: bool = False):
    """The parts with the caller's ``paged_attention`` / ``merge_states`` (the public ops, or a
    ``KernelOps``' own), then the merge; arguments already validated. Returns ``(out, lse)``.

    Two ``paged_attention`` calls: the shared segment (with the sinks) and the suffixes. ``fuse=True``
    makes them one call over ``[q; q]`` with ``causal=False`` and the plan's tables (row 0: the
    shared segment of all queries; rows 1..: one decode query per suffix, which as the last position
    of its row sees every key of it anyway); refused with sinks (one call would count them in both
    parts) or RoPE on load (the suffix positions are shifted). Not the default: on the C++ CPU
    backend it measured no faster (1 thread) or ~10 % slower (2 threads) than two calls.
    """
    kw = dict(scale=scale, softcap=softcap, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    B = plan.rows
    if fuse and (sink_logits is not None or rope_cos_sin is not None):
        fail(OP, "fuse", "False with sink_logits or rope_cos_sin (one call would count the sinks twice "
             "and rotate the suffix at the wrong positions)", fuse)
    if fuse:
        out, lse = paged_attention(torch.cat([q, q]), k_cache, v_cache, plan.block_table, plan.seq_lens,
                                   plan.cu_seqlens_q, B, max(plan.shared_len, plan.max_suffix_len), causal=False,
                                   **kw)
        return merge_states(out[:B], lse[:B], out[B:], lse[B:])
    rope_a = rope_b = {}
    if rope_cos_sin is not None:  # the suffix's key j sits at position shared_len + j
        rope_a = dict(rope_cos_sin=rope_cos_sin, rope_neox=rope_neox)
        rope_b = dict(rope_cos_sin=rope_cos_sin[plan.shared_len:], rope_neox=rope_neox)
    out_a, lse_a = paged_attention(q, k_cache, v_cache, plan.shared_table, plan.shared_lens, plan.shared_cu,
                                   B, plan.shared_len, causal=False, sink_logits=sink_logits, **kw, **rope_a)
    out_b, lse_b = paged_attention(q, k_cache, v_cache, plan.suffix_table, plan.suffix_lens, plan.suffix_cu,
                                   1, plan.max_suffix_len, causal=True, **kw, **rope_b)
    return merge_states(out_a, lse_a, out_b, lse_b)


def _public_paged_attention(*args, **kw):
    return _paged_attention(*args, check=False, **kw)


def _validate(q, k_cache, shared_blocks, block_table, seq_lens, max_seqlen_k, check: bool) -> None:
    tensor(OP, "q", q, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    dev = q.device
    rows = q.shape[0]
    tensor(OP, "shared_blocks", shared_blocks, ndim=1, dtypes=(torch.int32,), device=dev)
    if shared_blocks.shape[0] < 1:
        fail(OP, "shared_blocks", "at least one shared page id", "an empty tensor")
    tensor(OP, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
    if block_table.shape[0] != rows:
        fail(OP, "block_table", f"of {rows} rows (one per decode query in q)", f"shape {tuple(block_table.shape)}")
    tensor(OP, "seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    if seq_lens.shape[0] != rows:
        fail(OP, "seq_lens", f"of shape ({rows},) (one per decode query in q)", f"shape {tuple(seq_lens.shape)}")
    host_int(OP, "max_seqlen_k", max_seqlen_k)
    if not check:
        return
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    ids = shared_blocks.cpu()
    if bool(((ids < 0) | (ids >= num_blocks)).any()):
        fail(OP, "shared_blocks", f"page ids in [0, num_blocks={num_blocks})", ids.tolist())
    lens = seq_lens.long().cpu()
    if rows and int(lens.min()) < 0:
        fail(OP, "seq_lens", "suffix lengths >= 0 (0: the row has only the shared prefix)", lens.tolist())
    if rows and int(lens.max()) > max_seqlen_k:
        fail(OP, "max_seqlen_k", f">= the longest suffix ({int(lens.max())})", max_seqlen_k)
    need = (lens + block_size - 1) // block_size
    if rows and int(need.max()) > block_table.shape[1]:
        b = int(need.argmax())
        fail(OP, "seq_lens", f"<= the suffix block table's capacity {block_table.shape[1] * block_size} tokens",
             f"seq_lens[{b}]={int(lens[b])}")
    table = block_table.cpu()
    cols = torch.arange(block_table.shape[1])
    bad = (cols[None] < need[:, None]) & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, c = (int(x) for x in bad.nonzero()[0])
        fail(OP, "block_table", f"in [0, num_blocks={num_blocks}) where row {b} needs it",
             f"block_table[{b}, {c}]={int(table[b, c])}")


def cascade_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, shared_blocks: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor, max_seqlen_k: int, *,
                   scale: Optional[float] = None, softcap: Optional[float] = None,
                   sink_logits: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                   v_scale: Optional[torch.Tensor] = None, rope_cos_sin: Optional[torch.Tensor] = None,
                   rope_neox: bool = True, out: Optional[torch.Tensor] = None, return_lse: bool = False,
                   check: bool = True):
    """One decode query per row over a shared prefix + each row's own pages (see the module docstring).

    Equal (to the op tolerances) to ``paged_attention`` decode (causal, one query per row) over the
    full tables ``[shared_blocks, block_table[b]]`` of length ``P * block_size + seq_lens[b]``.

    Parameters
    ----------
    q: [rows, num_heads, head_dim], one decode query per row (fp16/bf16/fp32)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (as ``paged_attention``)
    shared_blocks: [P] int32, P >= 1: the pages holding keys ``0 .. P * block_size - 1`` of every row
    block_table: [rows, max_blocks] int32: row ``b``'s pages after the shared ones (key
        ``P * block_size + i * block_size ..`` in entry ``i``); unneeded entries are never read
    seq_lens: [rows] int32: row ``b``'s keys after the shared ones, >= 0 (its query is the last)
    max_seqlen_k: host int, >= every ``seq_lens`` entry
    scale, softcap, sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox: as ``paged_attention``
        (no ``window``: a sliding window does not see a whole prefix; use plain decode there)
    out: [rows, num_heads, head_dim] in q's dtype, written when given
    return_lse: also return ``lse: [rows, num_heads]`` fp32
    check: validate values too (one device->host sync)

    Returns
    -------
    out, or ``(out, lse)`` when ``return_lse``.

    Examples
    --------
    >>> import torch, kvmem
    >>> kc, vc = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    >>> q = torch.randn(3, 4, 8)
    >>> shared = torch.tensor([5, 2], dtype=torch.int32)           # 8 shared keys
    >>> own = torch.tensor([[0], [1], [3]], dtype=torch.int32)     # each row's next page
    >>> lens = torch.tensor([1, 4, 0], dtype=torch.int32)          # row 2: only the prefix
    >>> kvmem.ops.cascade_decode(q, kc, vc, shared, own, lens, 4).shape
    torch.Size([3, 4, 8])
    """
    _validate(q, k_cache, shared_blocks, block_table, seq_lens, max_seqlen_k, check)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    plan = plan_cascade(shared_blocks, block_table, seq_lens, max_seqlen_k, k_cache.shape[1])
    if check:  # the parts' own structure checks (shapes, dtypes, scales, rope table), values checked above
        from kvmem.ops.paged_attention import validate as pa_validate

        pa_validate.structure(q, k_cache, v_cache, plan.shared_table, plan.shared_lens, plan.shared_cu, plan.rows,
                              plan.shared_len, scale, False, None, softcap, sink_logits, k_scale, v_scale, out, True,
                              rope_cos_sin, rope_neox)
    o, lse = run(_public_paged_attention, _merge_states, q, k_cache, v_cache, plan, scale=scale, softcap=softcap,
                 sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale, rope_cos_sin=rope_cos_sin,
                 rope_neox=rope_neox)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_lse else o
