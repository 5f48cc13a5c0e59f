"""``PagedAttentionParams``: one ``paged_attention`` call, built once from the public arguments.

It is flattened only at the ``torch.library`` boundary (:meth:`to_schema`, in the order of the
``kvmem::paged_attention`` schema) and rebuilt on the other side (:meth:`from_schema`); these
two are the one place where the schema's "0 means none" sentinels of ``window``/``softcap`` are
converted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kvmem.dispatch import Call, aligned_16, describe
from kvmem.ops._common import features_of

OP = "paged_attention"

# Optional arguments a backend must declare (capability ``features``) to be given them.
FEATURE_OF = {"window": "window", "softcap": "softcap", "sink_logits": "sink_logits",
              "k_scale": "kv_scale", "v_scale": "kv_scale", "rope_cos_sin": "rope"}
# Optional arguments that only modify another one (rope_neox means nothing without rope_cos_sin).
MODIFIER_OF = {"rope_neox": "rope_cos_sin"}
# Optional arguments every backend implements.
COMMON = ("scale", "causal", "lse")


def default_scale(q, scale: Optional[float]) -> Optional[float]:
    """``scale``, or ``1/sqrt(head_dim)`` when None (and q looks like a query tensor)."""
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 3:
        return 1.0 / math.sqrt(q.shape[-1])
    return scale


@dataclass(frozen=True, eq=False)
class PagedAttentionParams:
    """Arguments of one ``paged_attention`` call, outputs included (fields in schema order).

    ``window``/``softcap`` are None for none (never 0); ``lse`` is None when not wanted. Shapes
    and meaning: ``kvmem.paged_attention``.
    """

    out: torch.Tensor
    lse: Optional[torch.Tensor]
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    causal: bool = True
    window: Optional[int] = None
    softcap: Optional[float] = None
    sink_logits: Optional[torch.Tensor] = None
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None
    rope_cos_sin: Optional[torch.Tensor] = None
    rope_neox: bool = True

    @classmethod
    def build(cls, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *,
              scale=None, causal=True, window=None, softcap=None, sink_logits=None, k_scale=None,
              v_scale=None, rope_cos_sin=None, rope_neox=True, out=None, return_lse=False) -> "PagedAttentionParams":
        """From the public arguments (already validated): default scale, outputs allocated."""
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
        return cls(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                   float(default_scale(q, scale)), causal, window, None if softcap is None else float(softcap),
                   sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox)

    def to_schema(self) -> tuple:
        """The ``kvmem::paged_attention`` arguments (window/softcap <= 0 mean none)."""
        return (self.out, self.lse, self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens,
                self.cu_seqlens_q, self.max_seqlen_q, self.max_seqlen_k, float(self.scale), self.causal,
                self.window or 0, float(self.softcap or 0.0), self.sink_logits, self.k_scale, self.v_scale,
                self.rope_cos_sin, self.rope_neox)

    @classmethod
    def from_schema(cls, out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                    max_seqlen_k, scale, causal, window, softcap, sink_logits, k_scale, v_scale,
                    rope_cos_sin=None, rope_neox=True) -> "PagedAttentionParams":
        return cls(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                   scale, causal, window if window > 0 else None, softcap if softcap > 0 else None,
                   sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox)

    @property
    def features(self):
        return features_of(FEATURE_OF, dict(window=self.window, softcap=self.softcap, sink_logits=self.sink_logits,
                                            k_scale=self.k_scale, v_scale=self.v_scale, rope_cos_sin=self.rope_cos_sin))

    def call(self) -> Call:
        return _call(self.q, self.k_cache, self.v_cache, self.max_seqlen_q, self.features)


def _call(q, k_cache, v_cache, max_seqlen_q, features) -> Call:
    tensors = (q, k_cache) if v_cache is None else (q, k_cache, v_cache)
    return Call(OP, q.device.type, q.dtype, q.shape[-1], k_cache.shape[1], q.shape[1], k_cache.shape[2],
                k_cache.dtype, features, int(max_seqlen_q), all(aligned_16(t) for t in tensors))


@describe(OP)
def describe_call(q, k_cache, v_cache=None, max_seqlen_q=1, window=None, softcap=None, sink_logits=None,
                  k_scale=None, rope_cos_sin=None, v_scale=None) -> Call:
    """``Call.paged_attention(...)``: the dispatcher's view of a call with these arguments."""
    given = dict(window=window, softcap=softcap, sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale,
                 rope_cos_sin=rope_cos_sin)
    return _call(q, k_cache, v_cache, max_seqlen_q, features_of(FEATURE_OF, given))
