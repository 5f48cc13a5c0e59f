"""Selection and eviction policies of the memory bank: tensor in, tensor out, once per step.

A policy never runs per block in Python and never syncs with the host on its own: the kernels
take *which blocks* to attend as bank positions, so a policy is a few torch ops over the step's
tables.

**Selection** (``SelectionPolicy.select``): called by the select stage (``kvmem.memory.stages``)
once per segment group per memory layer per step (a decode step: one call per layer for the whole
batch), with

* ``q: [T, Hq, D]`` the group's queries (exact mode: post-RoPE like the cached keys; extend mode:
  pre-RoPE like the summaries), ``summaries: [num_pages + 1, Hkv, 2, D]`` the layer's summary pool
  (by page id; rows never written hold NaN), ``bank_table: [n, max_bank]`` int32 each segment's
  row's bank (page ids, -1 padded), ``bank_lens: [n]`` int32 (a segment sees the first
  ``bank_lens`` entries), ``query_index: [n]`` int32 (the token of ``q`` the segment selects with,
  -1 = selects nothing), ``top_k`` (host int), ``scale`` (the layer's softmax scale) and, for a
  policy with ``needs_mass``, ``mass: [n, max_bank]`` fp32 the attention mass each bank block
  received so far (``bank_mass``);
* it returns ``selected: [n, Hkv, top_k]`` int32 positions into ``bank_table`` rows: for a segment
  with a query exactly ``min(top_k, bank_lens)`` distinct positions ``< bank_lens`` per KV head
  (extend mode places the window after ``n_sel`` selected blocks, planned on the host), none
  (all -1) without one; -1 pads. Any order: kvmem sorts them (the op takes them ascending).

``summary`` names the summary kind the policy reads (``kvmem.memory.config.SUMMARIES``; the pool
is written with it), or None for a policy that reads none. A policy whose ``validate`` is true
(every user policy, by default) has its output checked by ``validate_selected`` before any
attention kernel of the layer runs: out-of-range, duplicate or missing positions, a wrong shape or
dtype raise ``PolicyError`` naming the policy; that check costs one device->host sync per call
(set ``validate = False`` on a policy you trust). The built-ins are trusted.

**Eviction** (``EvictionPolicy.evict``): called once per step, between steps (when the step is
planned, before its own blocks join the banks), on every row's bank: ``bank_table: [B, W]``
int32, ``bank_lens: [B]`` int32 and, with ``needs_mass``, ``mass: [B, W]`` fp32, the attention
mass each bank block received, summed over the memory layers, KV heads, queries and steps (the
memory attention op's ``block_mass`` output, collected only when a policy needs it; a block
never selected has mass 0). It returns ``keep: [B, W]`` bool; a dropped block leaves the bank for
good (it is never a candidate again; its page stays the row's, in its block table, until the row
ends: it is not freed). Entries past ``bank_lens`` are ignored. A policy with ``budget_blocks``
is called only in steps where some row's bank holds more than that many blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from kvmem.memory import kernels
from kvmem.ops.memory_select.reference import SUMMARY_KINDS as SUMMARIES, top_k_positions

__all__ = ["PolicyError", "SelectionPolicy", "EvictionPolicy", "SummaryTopK", "MeanKey", "QuestMinMax", "InfLLMReps",
           "BoxScore", "StreamingLLM", "HeavyHitters", "selection_policy", "sort_selected", "validate_selected",
           "validate_keep", "bank_mass", "add_block_mass", "block_scores", "top_k_positions", "SELECTION_NAMES"]


class PolicyError(ValueError):
    """A memory policy returned something the kernels cannot take (raised before any attention
    kernel of the layer runs; the step is then rolled back as any failed step)."""


class SelectionPolicy:
    """Which bank blocks each (segment, KV head) attends to (protocol: the module docstring).

    Subclass it and set ``summary`` (the summary kind ``select`` reads, or None) and, for a policy
    that reads attention mass, ``needs_mass = True``. Instances are compared and hashed as part of
    ``MemoryConfig``: keep them hashable (a plain class, or a frozen dataclass).
    """

    summary: Optional[str] = None
    needs_mass: bool = False
    validate: bool = True  # check every output (one device->host sync per call)
    selects_blocks: bool = True  # False: selects nothing (the config's top_k must then be 0)

    @property
    def name(self) -> str:
        return type(self).__name__

    def select(self, q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor, bank_lens: torch.Tensor,
               query_index: torch.Tensor, top_k: int, *, scale: float,
               mass: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``selected: [n, Hkv, top_k]`` int32 positions into ``bank_table`` rows (module docstring)."""
        raise NotImplementedError(f"{self.name}.select")


class EvictionPolicy:
    """Which bank blocks stay in each row's bank (protocol: the module docstring)."""

    needs_mass: bool = False
    validate: bool = True
    budget_blocks: Optional[int] = None  # called only when some bank is larger (None: every step)

    @property
    def name(self) -> str:
        return type(self).__name__

    def evict(self, bank_table: torch.Tensor, bank_lens: torch.Tensor,
              mass: Optional[torch.Tensor]) -> torch.Tensor:
        """``keep: [B, W]`` bool (module docstring)."""
        raise NotImplementedError(f"{self.name}.evict")


def block_scores(q: torch.Tensor, summaries: torch.Tensor, bank_table: torch.Tensor, bank_lens: torch.Tensor,
                 query_index: torch.Tensor, *, summary: str, scale: Optional[float] = None) -> torch.Tensor:
    """``[n, Hkv, max_bank]`` fp32 scores of ``memory_select`` (the group rule over the summary's
    per-head scores; ``-inf`` past ``bank_lens`` or without a query), for a policy to adjust and
    finish with ``top_k_positions(scores, top_k)`` (``-inf`` is never selected)."""
    return kernels.block_scores(q, summaries, bank_table, bank_lens, query_index, summary=summary, scale=scale)


# ------------------------------------------------------------------------------ built-in selection
@dataclass(frozen=True)
class SummaryTopK(SelectionPolicy):
    """The top-k bank blocks by one summary's score and the group rule: ``memory_select`` with
    ``summary`` (``kvmem.ops.memory_select.reference``)."""

    summary: str = "mean"
    validate = False  # trusted: the op's own output

    def __post_init__(self):
        if self.summary not in SUMMARIES:
            raise ValueError(f"{self.name}: argument 'summary' must be one of {SUMMARIES}, got {self.summary!r}")

    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, *, scale, mass=None):
        return kernels.select(q, summaries, bank_table, bank_lens, query_index, top_k, summary=self.summary,
                              scale=scale)


@dataclass(frozen=True)
class MeanKey(SummaryTopK):
    """The default: each block's mean key, score ``q . mean``."""

    summary: str = "mean"


@dataclass(frozen=True)
class QuestMinMax(SummaryTopK):
    """Quest: channel-wise min/max per block, score ``sum_d max(q_d min_d, q_d max_d)`` (an upper
    bound of the block's best ``q . k``)."""

    summary: str = "minmax"


@dataclass(frozen=True)
class InfLLMReps(SummaryTopK):
    """InfLLM-style representative keys: the block's two keys farthest from its mean, score the
    larger of their ``q . k``."""

    summary: str = "reps"


@dataclass(frozen=True)
class BoxScore(SummaryTopK):
    """ArkVale's box digest: ``[centre, radius]``, score ``q . centre + |q| . radius``."""

    summary: str = "box"


@dataclass(frozen=True)
class StreamingLLM(SelectionPolicy):
    """StreamingLLM: attention sinks + the local window, no bank block (``top_k`` is 0)."""

    summary = None
    validate = False
    selects_blocks = False

    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, *, scale, mass=None):
        return torch.full((bank_table.shape[0], summaries.shape[1], top_k), -1, dtype=torch.int32,
                          device=bank_table.device)


#: ``MemoryConfig(selection=<name>)``
SELECTION_NAMES = {"mean": MeanKey, "minmax": QuestMinMax, "quest": QuestMinMax, "reps": InfLLMReps,
                   "infllm": InfLLMReps, "box": BoxScore, "streaming": StreamingLLM}


def selection_policy(value) -> SelectionPolicy:
    """A ``SelectionPolicy`` from a policy or one of ``SELECTION_NAMES``."""
    if isinstance(value, SelectionPolicy):
        return value
    if isinstance(value, str) and value in SELECTION_NAMES:
        return SELECTION_NAMES[value]()
    raise ValueError(f"MemoryConfig: argument 'selection' must be a kvmem.memory.SelectionPolicy or one of "
                     f"{sorted(SELECTION_NAMES)}, got {value!r}")


# ------------------------------------------------------------------------------ built-in eviction
@dataclass(frozen=True)
class HeavyHitters(EvictionPolicy):
    """H2O-style eviction: each row keeps the ``budget_blocks`` bank blocks with the largest
    accumulated attention mass (ties: the lower bank position); the rest leave the bank."""

    budget_blocks: int = 0
    needs_mass = True
    validate = False

    def __post_init__(self):
        b = self.budget_blocks
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(f"HeavyHitters: argument 'budget_blocks' must be an int >= 0, got {b!r}")

    def evict(self, bank_table, bank_lens, mass):
        batch, width = bank_table.shape
        live = torch.arange(width, device=bank_table.device)[None] < bank_lens.long()[:, None]
        score = torch.zeros(batch, width, device=bank_table.device) if mass is None else mass.float()
        score = torch.where(live, score, torch.full_like(score, -math.inf))
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :self.budget_blocks]
        keep = torch.zeros(batch, width, dtype=torch.bool, device=bank_table.device)
        keep.scatter_(1, order, True)
        return keep & live


# ------------------------------------------------------------------------------ mass bookkeeping
def bank_mass(page_mass: Optional[torch.Tensor], bank_table: torch.Tensor, bank_lens: torch.Tensor) -> torch.Tensor:
    """``[n, W]`` fp32 mass of each bank entry from ``page_mass: [num_pages + 1]`` (by page id; 0
    past ``bank_lens``; zeros when nothing was collected)."""
    if page_mass is None:
        return torch.zeros(bank_table.shape, dtype=torch.float32, device=bank_table.device)
    got = page_mass[bank_table.long().clamp(min=0)]
    live = torch.arange(bank_table.shape[1], device=bank_table.device)[None] < bank_lens.long()[:, None]
    return torch.where(live, got, torch.zeros_like(got))


def add_block_mass(page_mass: torch.Tensor, bank_table: torch.Tensor, block_mass: torch.Tensor) -> None:
    """``page_mass[bank_table[b, j]] += sum_h block_mass[b, h, j]`` in place (padding -1 adds to the
    scratch entry ``page_mass[-1]``); no host sync."""
    pages = bank_table.long()
    pages = torch.where(pages >= 0, pages, torch.full_like(pages, page_mass.shape[0] - 1))
    page_mass.index_add_(0, pages.reshape(-1), block_mass.sum(dim=1).reshape(-1).to(page_mass.dtype))


# ------------------------------------------------------------------------------ validation
def _fail(policy, what: str):
    raise PolicyError(f"memory policy {policy.name}: {what}")


def sort_selected(selected: torch.Tensor) -> torch.Tensor:
    """A selection in the order the memory-attention op takes it: ascending, -1 (empty) last. No
    host sync; run on every policy's output, checked (``validate``) or not."""
    if selected.shape[-1] == 0:
        return selected
    big = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(selected < 0, torch.full_like(selected, big), selected), dim=-1).values
    return torch.where(ordered == big, torch.full_like(ordered, -1), ordered)


def validate_selected(policy, selected, bank_lens: torch.Tensor, query_index: torch.Tensor, top_k: int,
                      num_kv_heads: int) -> torch.Tensor:
    """Check a selection policy's output and return it sorted (ascending, -1 last), or raise
    ``PolicyError`` naming the policy and the problem. One device->host sync (the flags)."""
    n = bank_lens.shape[0]
    if not isinstance(selected, torch.Tensor):
        _fail(policy, f"select must return a torch.Tensor, got {type(selected).__name__}")
    if selected.dtype != torch.int32:
        _fail(policy, f"select must return int32 positions, got dtype {selected.dtype}")
    if tuple(selected.shape) != (n, num_kv_heads, top_k):
        _fail(policy, f"select must return shape [n, Hkv, top_k] = {[n, num_kv_heads, top_k]}, "
                      f"got {list(selected.shape)}")
    if selected.device != bank_lens.device:
        _fail(policy, f"select must return a tensor on {bank_lens.device}, got {selected.device}")
    if top_k == 0:
        return selected
    ordered = sort_selected(selected)
    lens = bank_lens.long()[:, None, None]
    want = torch.where(query_index >= 0, bank_lens.long().clamp(max=top_k), 0)[:, None]  # [n, 1]
    filled = (ordered >= 0).sum(-1)  # [n, Hkv]
    flags = torch.stack([(selected < -1).any(), (ordered >= lens).any(),
                         ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(),
                         (filled != want).any()]).tolist()
    if flags[0]:
        _fail(policy, f"select returned positions < -1 (e.g. {int(selected.min())}); -1 is the only padding")
    if flags[1]:
        b = int((ordered >= lens).any(-1).any(-1).nonzero()[0])
        _fail(policy, f"select returned a position >= bank_lens (segment {b}: bank_lens={int(bank_lens[b])}, "
                      f"positions {ordered[b].tolist()})")
    if flags[2]:
        b = int(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1).any(-1).nonzero()[0])
        _fail(policy, f"select returned duplicate positions (segment {b}: {ordered[b].tolist()})")
    if flags[3]:
        b = int((filled != want).any(-1).nonzero()[0])
        _fail(policy, f"select must fill min(top_k, bank_lens) = {int(want[b])} positions per KV head for a "
                      f"segment with a query (0 without one), segment {b} got {filled[b].tolist()}")
    return ordered


def validate_keep(policy, keep, bank_table: torch.Tensor) -> torch.Tensor:
    """Check an eviction policy's ``keep`` (a bool tensor shaped like ``bank_table``) or raise
    ``PolicyError`` naming the policy."""
    if not isinstance(keep, torch.Tensor):
        _fail(policy, f"evict must return a torch.Tensor, got {type(keep).__name__}")
    if keep.dtype != torch.bool:
        _fail(policy, f"evict must return a bool tensor, got dtype {keep.dtype}")
    if keep.shape != bank_table.shape:
        _fail(policy, f"evict must return shape [B, W] = {list(bank_table.shape)}, got {list(keep.shape)}")
    return keep


def apply_eviction(policy: EvictionPolicy, bank_table: torch.Tensor, bank_lens: torch.Tensor,
                   page_mass: Optional[torch.Tensor]) -> List[List[int]]:
    """Run ``policy`` on the rows' banks and return, per row, the bank positions to keep (host ints,
    ascending); raises ``PolicyError`` (nothing changed) for a bad ``keep``. One device->host
    transfer (the mask)."""
    mass = bank_mass(page_mass, bank_table, bank_lens) if policy.needs_mass else None
    keep = policy.evict(bank_table, bank_lens, mass)
    if policy.validate:
        validate_keep(policy, keep, bank_table)
    keep = keep.cpu().tolist()
    return [[j for j in range(n) if keep[b][j]] for b, n in enumerate(bank_lens.tolist())]
