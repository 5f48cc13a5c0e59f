"""The memory bank: configuration, per-step tables, eviction bookkeeping and block summaries.

Evicted blocks stay pages of the pool; the bank is a list of their page ids per row
(``kvmem.memory.tables``), a summary per page (``kvmem.memory.summaries``), and the ops
``kvmem.ops.memory_select`` / ``kvmem.ops.memory_attention``. A step's host-side tables (chunks,
sub-block segments, evictions) are ``kvmem.memory.step``; the layer stages (write -> summarise ->
select -> attend) are ``kvmem.memory.stages``, which call the ops only through the seam
``kvmem.memory.kernels``. Users: ``kvmem.patch(model, memory_bank=MemoryConfig(...))`` (HF) and
``kvmem.nn.MemoryAttention`` (custom inference code). Selection and eviction policies (built-in or
a user's own small class: ``MemoryConfig(selection=..., eviction=...)``) are ``kvmem.memory.policies``.
"""

from kvmem.memory.config import MemoryConfig, trained_context
from kvmem.memory.policies import (BoxScore, EvictionPolicy, HeavyHitters, InfLLMReps, MeanKey, PolicyError,
                                   QuestMinMax, SelectionPolicy, StreamingLLM)
from kvmem.memory.summaries import compute_summaries, empty_summaries, write_summaries
from kvmem.memory.tables import RowBanks, num_selected, query_positions, selection_query_index, window_start

__all__ = ["MemoryConfig", "trained_context", "RowBanks", "window_start", "num_selected", "query_positions",
           "selection_query_index", "compute_summaries", "write_summaries", "empty_summaries", "SelectionPolicy",
           "EvictionPolicy", "PolicyError", "MeanKey", "QuestMinMax", "InfLLMReps", "BoxScore", "StreamingLLM",
           "HeavyHitters"]
