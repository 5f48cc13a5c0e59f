"""The memory bank: configuration, per-step tables, eviction bookkeeping and block summaries.

Evicted blocks stay pages of the pool; the bank is a list of their page ids per row
(``kvmem.memory.tables``), a summary per page (``kvmem.memory.summaries``), and the ops
``kvmem.ops.memory_select`` / ``kvmem.ops.memory_attention``. A step's host-side tables (chunks,
sub-block segments, evictions) are ``kvmem.memory.step``; the layer stages (write -> summarise ->
select -> attend) are ``kvmem.memory.stages``, which call the ops only through the seam
``kvmem.memory.kernels``. Users: ``kvmem.patch(model, memory_bank=MemoryConfig(...))`` (HF) and
``kvmem.nn.MemoryAttention`` (custom inference code).
"""

from kvmem.memory.config import MemoryConfig, trained_context
from kvmem.memory.summaries import compute_summaries, empty_summaries, write_summaries
from kvmem.memory.tables import RowBanks, num_selected, query_positions, selection_query_index, window_start

__all__ = ["MemoryConfig", "trained_context", "RowBanks", "window_start", "num_selected", "query_positions",
           "selection_query_index", "compute_summaries", "write_summaries", "empty_summaries"]
