"""The executable specification of kvmem's ops, in plain PyTorch with fp32 math: every backend
(CUDA, Triton, C++ CPU) is tested against these functions. The semantics are written once, in
``kvmem.ops.spec``; each op's reference lives in its folder (``kvmem/ops/<op>/reference.py``).
They do no argument checking (the public ops do) and favour clarity over speed.
"""

from kvmem.ops import spec
from kvmem.ops.cache_write.reference import cache_write
from kvmem.ops.memory_attention.reference import memory_attention
from kvmem.ops.memory_select.reference import memory_select
from kvmem.ops.merge_states.reference import merge_states
from kvmem.ops.paged_attention.reference import apply_rotary, paged_attention, visible_key_range

__doc__ += "\n" + spec.__doc__  # help(kvmem.ops.reference) shows the semantics too

__all__ = ["cache_write", "paged_attention", "merge_states", "memory_select", "memory_attention", "visible_key_range",
           "apply_rotary"]
