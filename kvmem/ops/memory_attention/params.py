"""``MemoryAttentionParams``: one ``memory_attention`` call, built once from the public arguments.

Flattened only at the ``torch.library`` boundary (:meth:`to_schema`, in the order of the
``kvmem::memory_attention`` schema) and rebuilt on the other side (:meth:`from_schema`): the one
place where the schema's "0 means none" sentinel of ``softcap`` is converted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kvmem.dispatch import Call, aligned_16, describe
from kvmem.ops._common import features_of

OP = "memory_attention"

# Optional arguments a backend must declare (capability ``features``) to be given them.
FEATURE_OF = {"softcap": "softcap", "sink_logits": "sink_logits", "k_scale": "kv_scale", "v_scale": "kv_scale",
              "rope_cos_sin": "rope", "block_mass": "block_mass"}
# Optional arguments that only modify another one (rope_neox means nothing without rope_cos_sin).
MODIFIER_OF = {"rope_neox": "rope_cos_sin"}
# Optional arguments every backend implements.
COMMON = ("scale", "lse")


@dataclass(frozen=True, eq=False)
class MemoryAttentionParams:
    """Arguments of one ``memory_attention`` call, outputs first (fields in schema order).

    ``lse`` and ``block_mass`` are None when not wanted; ``softcap`` is None for none (never 0).
    Shapes and meaning: ``kvmem.ops.memory_attention.memory_attention``.
    """

    out: torch.Tensor
    lse: Optional[torch.Tensor]
    block_mass: Optional[torch.Tensor]
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    sink_blocks: int
    window_start: torch.Tensor
    bank_table: torch.Tensor
    selected: torch.Tensor
    scale: float
    softcap: Optional[float] = None
    sink_logits: Optional[torch.Tensor] = None
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None
    rope_cos_sin: Optional[torch.Tensor] = None
    rope_neox: bool = True

    @classmethod
    def build(cls, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *,
              sink_blocks, window_start, bank_table, selected, scale=None, softcap=None, sink_logits=None,
              k_scale=None, v_scale=None, rope_cos_sin=None, rope_neox=True, return_lse=False,
              block_mass=None) -> "MemoryAttentionParams":
        """From the public arguments (already validated): default scale, outputs allocated."""
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return cls(out, lse, block_mass, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                   max_seqlen_k, sink_blocks, window_start, bank_table, selected, scale,
                   None if softcap is None else float(softcap), sink_logits, k_scale, v_scale, rope_cos_sin,
                   rope_neox)

    def to_schema(self) -> tuple:
        """The ``kvmem::memory_attention`` arguments (softcap <= 0 means none)."""
        return (self.out, self.lse, self.block_mass, self.q, self.k_cache, self.v_cache, self.block_table,
                self.seq_lens, self.cu_seqlens_q, self.max_seqlen_q, self.max_seqlen_k, self.sink_blocks,
                self.window_start, self.bank_table, self.selected, float(self.scale), float(self.softcap or 0.0),
                self.sink_logits, self.k_scale, self.v_scale, self.rope_cos_sin, self.rope_neox)

    @classmethod
    def from_schema(cls, out, lse, block_mass, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                    max_seqlen_q, max_seqlen_k, sink_blocks, window_start, bank_table, selected, scale, softcap,
                    sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox) -> "MemoryAttentionParams":
        return cls(out, lse, block_mass, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                   max_seqlen_k, sink_blocks, window_start, bank_table, selected, scale,
                   softcap if softcap > 0 else None, sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox)

    @property
    def features(self):
        return features_of(FEATURE_OF, {name: getattr(self, name) for name in FEATURE_OF})

    def call(self) -> Call:
        return _call(self.q, self.k_cache, self.v_cache, self.max_seqlen_q, self.features)


def _call(q, k_cache, v_cache, max_seqlen_q, features) -> Call:
    tensors = (q, k_cache) if v_cache is None else (q, k_cache, v_cache)
    return Call(OP, q.device.type, q.dtype, q.shape[-1], k_cache.shape[1], q.shape[1], k_cache.shape[2],
                k_cache.dtype, features, int(max_seqlen_q), all(aligned_16(t) for t in tensors))


@describe(OP)
def describe_call(q, k_cache, v_cache=None, max_seqlen_q=1, softcap=None, sink_logits=None, k_scale=None,
                  rope_cos_sin=None, v_scale=None, block_mass=None) -> Call:
    """``Call.memory_attention(...)``: the dispatcher's view of a call with these arguments."""
    given = dict(softcap=softcap, sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale,
                 rope_cos_sin=rope_cos_sin, block_mass=block_mass)
    return _call(q, k_cache, v_cache, max_seqlen_q, features_of(FEATURE_OF, given))
