"""Plain data types of the paged KV cache: layer groups, per-step metadata, usage."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, Hashable, Optional, Tuple, Union

import torch

__all__ = ["LayerGroupSpec", "StepMetadata", "StepPlan", "GroupUsage", "page_bytes"]


@dataclass(frozen=True)
class LayerGroupSpec:
    """Layers that share one block table.

    Parameters
    ----------
    name: the group's name (a key of ``StepPlan.groups``)
    layers: indices of the model layers in the group
    window: None for full attention; ``W`` for a sliding window where the key at ``j`` is visible to
        the query at ``p`` iff ``p - W < j <= p`` (``kvmem.ops.reference`` semantics). Blocks no
        current or future query can see are freed.
    """

    name: str
    layers: Tuple[int, ...]
    window: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"LayerGroupSpec: name must be a non-empty str, got {self.name!r}")
        try:
            layers = tuple(operator.index(i) for i in self.layers)
        except TypeError:
            raise TypeError(f"LayerGroupSpec {self.name!r}: layers must be ints, got {self.layers!r}") from None
        if not layers:
            raise ValueError(f"LayerGroupSpec {self.name!r}: layers must not be empty")
        if len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"LayerGroupSpec {self.name!r}: layers must be distinct ints >= 0, got {layers}")
        object.__setattr__(self, "layers", layers)
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int):
                raise TypeError(f"LayerGroupSpec {self.name!r}: window must be None or an int, got {self.window!r}")
            if self.window < 1:
                raise ValueError(f"LayerGroupSpec {self.name!r}: window must be >= 1, got {self.window}")


@dataclass
class StepMetadata:
    """Everything the ops need for one layer group in one forward step (device tensors).

    Attributes
    ----------
    block_table: [batch, max_blocks] int32; entry ``[b, i]`` is the block holding keys
        ``i*block_size ..`` of sequence ``b``, -1 where none is held (beyond the sequence, before a
        sliding window, or a padding row)
    seq_lens: [batch] int32, KV length after this step's write (0 for padding rows)
    cu_seqlens_q: [batch + 1] int32, prefix sums of the per-sequence query counts
    slot_mapping: [num_tokens] int64, ``block * block_size + offset`` of each new token; -1 = padding
    max_seqlen_q: host int, longest query segment of the step
    max_seqlen_k: host int, longest ``seq_lens`` entry
    window: the group's sliding window (pass it to ``paged_attention``), None for full attention
    cascade: a ``kvmem.ops.cascade.CascadePlan`` when the step's rows share leading pages and the
        step runs shared-prefix (cascade) decode (decided on the host at plan time), else None
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    slot_mapping: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    window: Optional[int] = None
    cascade: Optional[object] = None

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    def to(self, device: Union[str, torch.device]) -> "StepMetadata":
        """The same metadata on ``device`` (self when already there; copies are non-blocking)."""
        device = torch.device(device)
        if self.block_table.device == device:
            return self
        mv = [t.to(device, non_blocking=True) for t in (self.block_table, self.seq_lens, self.cu_seqlens_q,
                                                         self.slot_mapping)]
        cascade = None if self.cascade is None else self.cascade.to(device)
        return StepMetadata(*mv, self.max_seqlen_q, self.max_seqlen_k, self.window, cascade)


@dataclass
class StepPlan:
    """The result of ``KVCacheManager.plan``: per-group metadata of one forward step.

    Attributes
    ----------
    groups: group name -> its StepMetadata (``seq_lens``/``cu_seqlens_q`` are shared tensors)
    layer_to_group: layer index -> group name
    seq_ids: the planned sequences, in batch order (rows of every tensor; padding rows follow)
    num_tokens: real (unpadded) number of new tokens
    copies: group name -> (src_block, dst_block) copy-on-write pairs pending at plan time; apply them
        with ``KVCacheManager.apply_copies(pools)`` before this step's cache writes
    """

    groups: Dict[str, StepMetadata]
    layer_to_group: Dict[int, str]
    seq_ids: Tuple[Hashable, ...] = ()
    num_tokens: int = 0
    copies: Dict[str, Tuple[Tuple[int, int], ...]] = field(default_factory=dict)

    def for_layer(self, layer_idx: int) -> StepMetadata:
        """The StepMetadata of the group ``layer_idx`` belongs to."""
        try:
            return self.groups[self.layer_to_group[layer_idx]]
        except KeyError:
            raise KeyError(
                f"StepPlan.for_layer: layer {layer_idx} is in no layer group "
                f"(known layers: {sorted(self.layer_to_group)})"
            ) from None


@dataclass(frozen=True)
class GroupUsage:
    """Memory use of one layer group.

    Attributes
    ----------
    name: the group's name
    num_blocks: blocks in the group's pools
    blocks_used: blocks with refcount > 0
    blocks_free: blocks allocate() can hand out (includes cached free blocks)
    blocks_cached: blocks registered for prefix reuse (in use or cached free)
    num_tokens: tokens whose K/V the group holds, summed over live sequences (shared blocks count
        once per sequence; tokens of blocks a sliding window freed are not counted)
    bytes_used, bytes_total: ``blocks_used`` / ``num_blocks`` times the bytes of one block over all
        the group's layers, K and V; None when the manager was not given ``bytes_per_block``
    """

    name: str
    num_blocks: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    num_tokens: int
    bytes_used: Optional[int] = None
    bytes_total: Optional[int] = None

    @property
    def utilization(self) -> float:
        """Fraction of blocks in use."""
        return self.blocks_used / self.num_blocks


def page_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block across ``num_layers`` layers, K and V (for ``bytes_per_block``)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem
