"""Fixed-shape decode-step metadata of a paged cache: what CUDA graphs and ``torch.compile`` need.

Torch only; the Hugging Face cache (``kvmem.integrations.hf.PagedKVCache``) is its user.

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
* **device half**, the forward: the ``"kvmem"`` attention function runs the layer step
  (``kvmem.layer.run_layer``) over ``metadata(layer)``: the new keys/values are written at the
  static ``slot_mapping`` and ``paged_attention`` reads the static block table and ``seq_lens``
  with constant host bounds (``max_seqlen_q = 1``, ``max_seqlen_k`` =
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

from typing import Dict, List, Optional, Tuple

import torch

from kvmem.cache.metadata import StepMetadata

__all__ = ["StaticDecodeBuffers", "check_decode_mask"]


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

    Attributes
    ----------
    block_table: group name -> [rows, width] int32 (-1 = no block)
    slot_mapping: group name -> [rows] int64, this step's slot of each row's new token
    seq_lens: [rows] int32, KV lengths after this step's write (all groups)
    cu_seqlens_q: [rows + 1] int32, ``arange(rows + 1)`` (one query per row)
    max_seqlen_k: host int ``width * block_size`` (constant)
    group_metadata: group name -> the ``StepMetadata`` over these buffers (same objects every step)
    pools: layer -> (k_cache, v_cache) of the cache
    scales: layer -> (k_scale, v_scale) of a float8 cache (fixed tensors), empty otherwise
    """

    def __init__(self, groups, num_layers: int, rows: int, width: int, block_size: int, device: torch.device):
        self.rows, self.width, self.block_size = int(rows), int(width), int(block_size)
        self.device = torch.device(device)
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
        self.group_metadata: Dict[str, StepMetadata] = {
            g.name: StepMetadata(self.block_table[g.name], self.seq_lens, self.cu_seqlens_q, self.slot_mapping[g.name],
                                 1, self.max_seqlen_k, g.window) for g in groups}
        self.pools: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.scales: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.centers: Dict[int, Optional[torch.Tensor]] = {}  # layer -> fixed key mean mu (centred keys)
        self.active = False  # True between the host half and the end of the step

    def fill(self, plan) -> None:
        """Copy a ``StepPlan`` of ``rows`` one-token rows (planned with ``max_blocks_per_seq=width``) in place."""
        for name, md in plan.groups.items():
            self.block_table[name].copy_(md.block_table, non_blocking=True)
            self.slot_mapping[name].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens.copy_(md.seq_lens, non_blocking=True)

    def metadata(self, layer_idx: int) -> StepMetadata:
        """The step's ``StepMetadata`` of ``layer_idx``'s group (persistent buffers, constant bounds)."""
        return self.group_metadata[self.layer_group[layer_idx]]


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
