"""Fixed-shape decode-step metadata of a ``PagedKVCache``: what CUDA graphs and ``torch.compile`` need.

Why the step is split in two
----------------------------
A captured decode step (a CUDA graph replay, or a ``torch.compile(fullgraph=True)`` graph that
must not recompile) may not allocate new metadata tensors, see a changed host int, read a device
value on the host, or branch in Python on tensor values. The allocator is host code, so a step is
split:

* **host half**, before the forward and outside any captured region
  (``PagedKVCache.static_decode_step``): the allocator reserves one slot per row
  (``KVCacheManager.plan`` with a fixed ``max_blocks_per_seq``), pending copy-on-write copies are
  applied, and the step's metadata is copied *in place* into the persistent buffers below; the
  attention mask is checked on the device (``torch._assert_async``), never read back.
* **device half**, the forward: ``PagedKVCache.update`` writes the new keys/values at the static
  ``slot_mapping`` and the ``"kvmem"`` attention function runs ``paged_attention`` over the static
  block table and ``seq_lens`` with constant host bounds (``max_seqlen_q = 1``, ``max_seqlen_k`` =
  the table's capacity). Nothing in it depends on a host value that changes between steps.

vLLM's decode CUDA graphs and FlashInfer's plan/run split follow the same rule. The shapes are
fixed per batch size (``rows``) and per cache (``width`` blocks per row, from the cache's
``max_cache_len``); the kernels only need bounds, so a table wider than the sequences costs
nothing but its -1 entries.

Why ``rows`` is the batch and not a padded maximum: vLLM pads every step's batch up to a captured
size because its batch changes every step. A ``generate()`` call keeps one batch size for all its
decode steps (beam search reorders rows, it does not change their number), so buffers (and
graphs) per batch size cost one capture per size and never run padding rows. Why the host half
still goes through ``KVCacheManager.plan`` and copies its tensors in: one code path validates and
builds every step's metadata (eager and static), and the copy is a few hundred bytes per group.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["StaticDecodeBuffers", "active", "check_decode_mask", "tokens"]

# .buffers: the StaticDecodeBuffers of this thread's static step in flight. Thread-local, so that an
# eager forward of another model in another thread never takes the static path (torch.compile
# traces reads of it and guards on them like any attribute).
_tls = threading.local()


def tokens(x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H, S, D] -> [B*S, H, D] (token-major; a view when B == 1 or S == 1), real tokens only."""
    B, H, S, D = x.shape
    t = x.transpose(1, 2).reshape(B * S, H, D)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if index is None else t.index_select(0, index)


def active() -> Optional["StaticDecodeBuffers"]:
    """The ``StaticDecodeBuffers`` of this thread's static decode step in flight, or None (eager steps)."""
    return getattr(_tls, "buffers", None)


def _set_active(buffers: Optional["StaticDecodeBuffers"]) -> None:
    _tls.buffers = buffers


class StaticDecodeBuffers:
    """Persistent metadata buffers of a cache's 1-token-per-row decode steps, updated in place.

    Parameters
    ----------
    groups: the cache's layer groups (``LayerGroupSpec``)
    num_layers: layers of the model
    rows: batch rows (every step of these buffers has exactly ``rows`` new tokens)
    width: block-table width (blocks per row the buffers can address)
    block_size: tokens per block
    device: of the pools and buffers
    ops: the cache's ``KernelOps``

    Attributes
    ----------
    block_table: group name -> [rows, width] int32 (-1 = no block)
    slot_mapping: group name -> [rows] int64, this step's slot of each row's new token
    seq_lens: [rows] int32, KV lengths after this step's write (all groups)
    cu_seqlens_q: [rows + 1] int32, ``arange(rows + 1)`` (one query per row)
    max_seqlen_k: host int ``width * block_size`` (constant)
    pools: layer -> (k_cache, v_cache) of the cache
    """

    def __init__(self, groups, num_layers: int, rows: int, width: int, block_size: int, device: torch.device,
                 ops):
        self.rows, self.width, self.block_size = int(rows), int(width), int(block_size)
        self.device = torch.device(device)
        self.ops = ops
        self.max_seqlen_k = self.width * self.block_size
        self.seq_lens = torch.zeros(self.rows, dtype=torch.int32, device=self.device)
        self.cu_seqlens_q = torch.arange(self.rows + 1, dtype=torch.int32, device=self.device)
        self.block_table: Dict[str, torch.Tensor] = {
            g.name: torch.full((self.rows, self.width), -1, dtype=torch.int32, device=self.device) for g in groups}
        self.slot_mapping: Dict[str, torch.Tensor] = {
            g.name: torch.full((self.rows,), -1, dtype=torch.int64, device=self.device) for g in groups}
        layer_group: List[Optional[str]] = [None] * num_layers
        layer_window: List[Optional[int]] = [None] * num_layers
        for g in groups:
            for layer in g.layers:
                layer_group[layer], layer_window[layer] = g.name, g.window
        self.layer_group, self.layer_window = layer_group, layer_window
        self.pools: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.active = False  # True between the host half and the end of the step

    def fill(self, plan) -> None:
        """Copy a ``StepPlan`` of ``rows`` one-token rows (planned with ``max_blocks_per_seq=width``) in place."""
        for name, md in plan.groups.items():
            self.block_table[name].copy_(md.block_table, non_blocking=True)
            self.slot_mapping[name].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens.copy_(md.seq_lens, non_blocking=True)

    # ------------------------------------------------------------------ device half (traced / captured)
    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write the step's keys/values ``[rows, Hkv, 1, D]`` of one layer into its pools."""
        k_cache, v_cache = self.pools[layer_idx]
        self.ops.cache_write(tokens(key), tokens(value), k_cache, v_cache,
                             self.slot_mapping[self.layer_group[layer_idx]])

    def attend(self, layer_idx: int, query: torch.Tensor, *, scale: float, window: Optional[int],
               softcap: Optional[float], sink_logits: Optional[torch.Tensor]) -> torch.Tensor:
        """Paged attention of one layer's queries ``[rows, Hq, 1, D]``; returns ``[rows, 1, Hq, D]``."""
        if window != self.layer_window[layer_idx]:
            raise ValueError(f"kvmem: layer {layer_idx} attends with sliding_window={window} but this PagedKVCache "
                             f"was built with window {self.layer_window[layer_idx]} for it")
        B, Hq, S, D = query.shape
        k_cache, v_cache = self.pools[layer_idx]
        out = self.ops.paged_attention(tokens(query), k_cache, v_cache, self.block_table[self.layer_group[layer_idx]],
                                       self.seq_lens, self.cu_seqlens_q, 1, self.max_seqlen_k, scale=scale,
                                       window=window, softcap=softcap, sink_logits=sink_logits)
        return out.view(B, S, Hq, D)


def check_decode_mask(mask: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Check a decode step's 2D mask on the device, without reading it back.

    The step's new column must be all real tokens and each row's real tokens must number its KV
    length after the step (``seq_lens``): kvmem drops padding when tokens are added and cannot mask
    tokens it already holds. ``generate()`` appends a column of ones, so this holds there. On CPU a
    failure raises at once (RuntimeError); on a GPU it is a device-side assert (fatal to the process,
    as any failed device assert) instead of a host sync every step.
    """
    m = mask.to(torch.bool)
    lens = seq_lens[: m.shape[0]].to(m.device, non_blocking=True)
    ok = m[:, -1].all() & (m.sum(1, dtype=torch.int32) == lens).all()
    torch._assert_async(ok, "kvmem: a decode step's attention mask marks its new token as padding, or its earlier "
                            "columns disagree with the tokens the PagedKVCache holds")
