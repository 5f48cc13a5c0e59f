"""kvmem's ops: public, validated entry points over ``torch.ops.kvmem.*`` custom ops.

``kvmem.ops.reference`` is the specification every backend is tested against.
"""

from kvmem.ops import reference
from kvmem.ops.cache_write import cache_write
from kvmem.ops.merge_states import merge_states
from kvmem.ops.paged_attention import paged_attention

__all__ = ["cache_write", "paged_attention", "merge_states", "reference"]
