"""The memory bank in a ``PagedKVCache``: ``kvmem.patch(model, memory_bank=kvmem.MemoryConfig(...))``.

* ``bank_spec`` (patch time): resolves the ``MemoryConfig`` against the model, picks the memory
  layers (the full-attention layers after the first ``dense_layers``; sliding-window layers keep
  their window) and, in extend mode, checks the model's RoPE and builds the RoPE table of
  ``max_distance + block_size`` positions from the model's own rotary module
  (``kvmem.integrations.hf.rope``). Every error is raised before the model is changed.
* ``CacheBank`` (one per ``PagedKVCache``): the rows' ``RowBanks``, one summary pool per memory
  layer ``[num_pages + 1, Hkv, 2, D]`` fp32 beside the page pool, the step's memory tables
  (``kvmem.memory.step.plan_memory_step``, built on the host once per step when the step is
  planned) and the layer step (``run``): extend mode un-rotates ``q``/``k`` with the
  ``(cos, sin)`` the module applied (recorded by ``kvmem.patch``'s pre-hook), then
  ``run_layer(..., stages=kvmem.memory.stages.MEMORY_STAGES)``. The config's eviction policy
  (``kvmem.memory.policies``) runs on the row banks when a step is planned (``_apply_eviction``:
  rolled back with the step), and a policy that reads attention mass gets ``page_mass``, one
  ``[num_pages + 1]`` fp32 tensor the memory layers add their ``block_mass`` to.
* ``MemoryReport`` (``model._kvmem_memory_report``): the selections of the latest prefill.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence

import torch

from kvmem.integrations import families
from kvmem.layer import run_layer, tokens
from kvmem.memory import MemoryConfig, RowBanks, policies
from kvmem.memory.stages import MEMORY_STAGES, LayerMemory
from kvmem.memory.step import plan_memory_step

_log = logging.getLogger("kvmem")

__all__ = ["BankSpec", "MemoryReport", "CacheBank", "bank_spec"]


class MemoryReport:
    """What the memory layers selected at the **latest prefill** (a step with more than one new
    token per row; decode steps leave it alone), for each row's **last query sub-block**: the one
    whose last query produces the first generated token.

    Attributes
    ----------
    selected: layer -> [batch, num_kv_heads, top_k] int page ids (-1 = empty), on the device
    page_tables: per row, its block table (page ids in cache order)
    window_start: per row, the first window block of that sub-block
    block_size, sink_blocks: of the config
    """

    def __init__(self):
        self.selected: Dict[int, torch.Tensor] = {}
        self.page_tables: List[List[int]] = []
        self.window_start: List[int] = []
        self.block_size = 0
        self.sink_blocks = 0
        self.attached_pages: List[int] = []  # the pages the attached banks' blocks were written to

    def __repr__(self) -> str:
        return f"MemoryReport({len(self.selected)} layers, {len(self.page_tables)} rows)"

    def attached_recall(self, blocks: Sequence[int], row: int = 0) -> float:
        """Fraction of memory layers in which some KV head selected one of the attached banks' blocks
        ``blocks`` (indices into the attached banks' blocks, in attach order) for row ``row``."""
        if not self.selected:
            raise ValueError("MemoryReport.attached_recall: no prefill with the memory bank was recorded")
        pages = {self.attached_pages[b] for b in blocks}
        hits = sum(any(pages & set(head) for head in self.selected_pages(layer, row)) for layer in self.selected)
        return hits / len(self.selected)

    def selected_pages(self, layer: int, row: int = 0) -> List[List[int]]:
        """Per KV head, the page ids layer ``layer`` selected for row ``row``."""
        return [[p for p in head if p >= 0] for head in self.selected[layer][row].tolist()]

    def needle_recall(self, needle_span: Sequence[int], row: int = 0) -> float:
        """Fraction of memory layers in which some KV head selected a page holding a token of
        ``needle_span = (start, end)`` (token positions of row ``row``). A needle that overlaps the
        sinks or the local window (attended without selection) counts as recalled in every layer.

        Raises
        ------
        ValueError
            when no prefill was recorded
        """
        if not self.selected or row >= len(self.page_tables):
            raise ValueError("MemoryReport.needle_recall: no prefill with the memory bank was recorded")
        start, end = int(needle_span[0]), int(needle_span[1])
        bs = self.block_size
        if start < self.sink_blocks * bs or end > self.window_start[row] * bs:
            return 1.0
        needle = set(self.page_tables[row][start // bs:(end - 1) // bs + 1])
        hits = sum(any(needle & set(head) for head in self.selected_pages(layer, row)) for layer in self.selected)
        return hits / len(self.selected)


@dataclass
class BankSpec:
    """A patched model's memory bank: the resolved config, its layers, the RoPE table (extend)."""

    config: MemoryConfig
    layers: FrozenSet[int]
    rope_table: Optional[torch.Tensor] = None
    half_table: bool = False
    #: the attached ``kvmem.MemoryBank`` s (``kvmem.patch(..., banks=)`` / ``kvmem.set_banks``), in bank order
    attached: tuple = ()
    report: MemoryReport = field(default_factory=MemoryReport)
    _tables: Dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def rope_on(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.rope_table is None:
            return None
        if device not in self._tables:
            self._tables[device] = self.rope_table.to(device)
        return self._tables[device]


def bank_spec(model, memory_bank, page_size: int) -> BankSpec:
    """Resolve ``memory_bank`` for ``model`` with pages of ``page_size`` tokens (see the module
    docstring). Raises TypeError / ValueError / ``UnsupportedModelError`` naming what was expected."""
    if not isinstance(memory_bank, MemoryConfig):
        raise TypeError(f"kvmem.patch: memory_bank must be a kvmem.MemoryConfig, got {type(memory_bank).__name__}")
    cfg = memory_bank.resolve(model.config, page_size)
    if cfg.block_size != page_size:
        raise ValueError(f"kvmem.patch: memory_bank block_size={cfg.block_size} must equal the page size "
                         f"block_size={page_size} (one bank block is one page)")
    full = [i for i, w in enumerate(families.layer_windows(model.config)) if w is None]
    if not full:
        raise ValueError("kvmem.patch: memory_bank serves full-attention layers, and this model has none "
                         "(every layer has a sliding window)")
    if cfg.dense_layers >= len(full):
        raise ValueError(f"MemoryConfig: argument 'dense_layers' must be < the model's {len(full)} full-attention "
                         f"layers (at least one memory layer), got {cfg.dense_layers}")
    layers = frozenset(full[cfg.dense_layers:])
    spec = BankSpec(cfg, layers)
    if cfg.mode == "extend":
        from kvmem.integrations.hf import rope

        rope.rope_layout(model)  # UnsupportedModelError: no RoPE / interleaved RoPE
        first = min(layers)
        spec.half_table = rope.rope_half_table(model, layer_idx=first)
        spec.rope_table = rope.rope_table(model, cfg.max_distance + cfg.block_size, layer_idx=first)
    spec.report.block_size, spec.report.sink_blocks = cfg.block_size, cfg.sink_blocks
    return spec


class CacheBank:
    """The memory bank state of one ``PagedKVCache`` (see the module docstring)."""

    def __init__(self, spec: BankSpec, num_kv_heads: int, head_dim: int):
        self.spec, self.config = spec, spec.config
        self.layers = spec.layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.banks: Optional[RowBanks] = None
        self.summaries: Dict[int, torch.Tensor] = {}
        self._saved = None  # the RowBanks state and page mass before the step in flight (rollback)
        self._report: Dict[int, torch.Tensor] = {}
        self.page_mass: Optional[torch.Tensor] = None  # [num_pages + 1] fp32 (a policy reads attention mass)
        #: the attached banks of this cache (fixed for its life) and the pool pages holding them
        self.attached = tuple(spec.attached)
        self.attached_pages: List[int] = []
        self._filled: Dict[int, torch.Tensor] = {}  # layer -> the summary pool its attached pages were written for
        for b in self.attached:
            if b.identity.get("num_kv_heads") != num_kv_heads:
                raise ValueError(f"kvmem: attached memory banks hold {b.identity.get('num_kv_heads')} KV heads, this "
                                 f"cache {num_kv_heads} (tensor parallelism with attached banks is not supported yet)")

    # ----------------------------------------------------------------- attached banks
    @property
    def attached_blocks(self) -> int:
        """Pages the attached banks take in the full-attention pool (on top of its sizing)."""
        return sum(b.num_blocks for b in self.attached)

    def take_pages(self, allocator) -> None:
        """Reserve the attached banks' pages from the full-attention group's ``allocator`` (once, when
        the cache's pools are sized); they stay allocated, read-only, for the cache's life."""
        self.attached_pages = allocator.allocate(self.attached_blocks) if self.attached_blocks else []
        self._filled = {}

    def _fill(self, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: torch.Tensor) -> None:
        """Write the attached banks' blocks of ``layer_idx`` into their pages and summaries (once per pool)."""
        if not self.attached_pages or self._filled.get(layer_idx) is summaries:
            return
        pages = torch.tensor(self.attached_pages, dtype=torch.long, device=k_cache.device)
        k = torch.cat([b.keys[layer_idx] for b in self.attached]).to(k_cache.device)
        v = torch.cat([b.values[layer_idx] for b in self.attached]).to(v_cache.device)
        if k.dtype != k_cache.dtype:
            raise ValueError(f"kvmem: the attached memory banks hold {k.dtype} keys, the KV pool is {k_cache.dtype}")
        k_cache.index_copy_(0, pages, k)
        v_cache.index_copy_(0, pages, v)
        s = torch.cat([b.summaries_of(layer_idx, self.config.summary) for b in self.attached])
        summaries.index_copy_(0, pages, s.to(summaries.device, torch.float32))
        self._filled[layer_idx] = summaries

    # ----------------------------------------------------------------- memory
    def bytes_per_page(self) -> int:
        """Summary bytes per page of the full-attention pool, over every memory layer."""
        return len(self.layers) * self.num_kv_heads * 2 * self.head_dim * 4

    def bytes_reserved(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.summaries.values())

    # ----------------------------------------------------------------- steps
    def reset(self) -> None:
        self.banks, self._saved = None, None
        self.page_mass = None

    def plan(self, page_tables: List[List[int]], prev: List[int], q_lens: List[int], device):
        """Evict and build the step's ``MemoryStep`` (host, once per step)."""
        cfg = self.config
        if self.banks is None:
            self.banks = RowBanks(sink_blocks=cfg.sink_blocks, window=cfg.window, block_size=cfg.block_size)
            for _ in prev:
                self.banks.add_row(attached=self.attached_pages)
        if self.attached_pages and any(q > 1 and p + q <= cfg.sink_tokens for p, q in zip(prev, q_lens)):
            _log.warning("kvmem: a prompt of at most sink_tokens=%d tokens cannot retrieve from the attached memory "
                         "banks (only queries past the sinks select); use a longer prompt or fewer sink_tokens",
                         cfg.sink_tokens)
        b = self.banks
        self._saved = (b.snapshot(), None if self.page_mass is None else self.page_mass.clone())
        self._report = {}
        self._apply_eviction(device)
        ms = plan_memory_step(b, page_tables, prev, q_lens, top_k=cfg.top_k, chunk_size=cfg.chunk_size,
                              device=device)
        if self.page_mass is not None and ms.summarise.numel():  # pages new to the bank start at 0
            self.page_mass[ms.summarise.to(self.page_mass.device)] = 0.0
        return ms

    def _apply_eviction(self, device) -> None:
        """The eviction policy on every row's bank, before the step's own evictions (host; one
        device->host transfer of its mask; skipped while no bank exceeds its ``budget_blocks``).
        A bad ``keep`` raises ``PolicyError`` with the banks unchanged."""
        policy, b = self.config.eviction, self.banks
        if policy is None or b is None or not len(b):
            return
        lens = [len(p) for p in b.pages]
        if policy.budget_blocks is not None and max(lens) <= policy.budget_blocks:
            return
        keep = policies.apply_eviction(policy, b.bank_table(device=device), b.bank_lens(device=device),
                                       self.page_mass)
        b.retain(keep)

    def _mass_for(self, k_cache: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.config.needs_mass:
            return None
        if self.page_mass is None or self.page_mass.device != k_cache.device:
            self.page_mass = torch.zeros(k_cache.shape[0] + 1, dtype=torch.float32, device=k_cache.device)
        return self.page_mass

    def rollback(self) -> None:
        """Undo the evictions of a step that did not complete."""
        if self._saved is not None and self.banks is not None:
            state, mass = self._saved
            self.banks.restore(state)
            self.page_mass = mass  # the mass the step's layers added before it failed is not kept
        self._saved = None

    def finish(self, step) -> None:
        """The step completed: keep its evictions; a prefill's selections become the report."""
        self._saved = None
        ms = step.memory
        if self._report and step.q_len > 1 and ms is not None:
            rep = self.spec.report
            rep.selected = dict(self._report)
            rep.page_tables = ms.page_tables
            rep.window_start = list(ms.last_window_start)
            rep.attached_pages = list(self.attached_pages)
        self._report = {}

    def run(self, ops, step, layer_idx: int, query, key, value, index, k_cache, v_cache, md, attention,
            scales=None, keys=None):
        """One memory layer: ``[B, H, S, D]`` q/k/v (after RoPE) -> out ``[T, Hq, D]`` of the real tokens.
        ``scales(layer_idx, k, v, center) -> (k_scale, v_scale)``: a float8 cache's scales of the keys as
        cached (pre-RoPE in extend mode), None for a float cache; ``keys(layer_idx, k)``: the keys
        as the pages store them (centred keys, ``kvmem.cache.scales``), None = as they are.

        Key centring is never asked for in a memory layer. Extend mode rotates the keys as they are
        read: ``rotate(mu)`` depends on the key's position, so the score shift would not be one
        constant per query. Exact mode: the memory attention merges partials of this one layer's
        pages, all shifted alike (that part would be exact), but the page selection scores a KV
        head's pages with the *maximum over its GQA group's query heads*, and each query head's
        shift ``q_g . mu`` differs, so the max (and the top-k) would change."""
        if self.spec.rope_table is not None:
            query, key = self._unrotate(step, layer_idx, query, key)
        q, k, v = tokens(query, index), tokens(key, index), tokens(value, index)
        ks, vs = (None, None) if scales is None else scales(layer_idx, k, v, False)
        if keys is not None:
            k = keys(layer_idx, k)
        summaries = self.summaries.get(layer_idx)
        if summaries is None or summaries.device != k_cache.device:
            summaries = torch.full((k_cache.shape[0] + 1, self.num_kv_heads, 2, self.head_dim), float("nan"),
                                   dtype=torch.float32, device=k_cache.device)
            self.summaries[layer_idx] = summaries
        self._fill(layer_idx, k_cache, v_cache, summaries)
        ctx = step.layer_context(layer_idx)
        if self.spec.rope_table is not None:  # used: a later step of this layer must record its own
            step.position_embeddings.pop(layer_idx, None)
        ctx.memory = LayerMemory(self.config, step.memory, summaries, self.spec.rope_on(k_cache.device),
                                 self._mass_for(k_cache))
        out = run_layer(ops, q, k, v, k_cache, v_cache, md, attention, ctx, stages=MEMORY_STAGES, k_scale=ks,
                        v_scale=vs)
        if step.q_len > 1:
            self._record(layer_idx, step.memory, ctx.selections)
        return out

    def _unrotate(self, step, layer_idx, query, key):
        from kvmem.integrations.hf import rope

        pe = step.position_embeddings.get(layer_idx)
        S = query.shape[2]
        if pe is None or not isinstance(pe, (tuple, list)) or len(pe) != 2 or pe[0].shape[-2] != S:
            got = "none" if pe is None else (f"cos of shape {tuple(pe[0].shape)}" if isinstance(pe, (tuple, list))
                                             else type(pe).__name__)
            raise ValueError(
                f"kvmem: memory_bank mode='extend' needs the (cos, sin) position embeddings layer {layer_idx}'s "
                f"attention module applies to its {S} new tokens (recorded by kvmem.patch's pre-hook from its "
                f"position_embeddings argument), got {got}; use MemoryConfig(mode='exact') for this model")
        cos, sin = pe
        half = self.spec.half_table
        return rope.unrotate(query, cos, sin, half_table=half), rope.unrotate(key, cos, sin, half_table=half)

    def _record(self, layer_idx, ms, selections) -> None:
        rows = []
        for last in ms.last_segment:
            if last is None:
                rows.append(None)
                continue
            g, s = last
            bank_table, selected = selections[g]
            sel = selected[s].long()  # [Hkv, K]
            pages = bank_table[s].long()[sel.clamp(min=0)]
            rows.append(torch.where(sel >= 0, pages, torch.full_like(pages, -1)))
        ref = next((r for r in rows if r is not None), None)
        if ref is None:
            return
        self._report[layer_idx] = torch.stack([r if r is not None else torch.full_like(ref, -1) for r in rows])
