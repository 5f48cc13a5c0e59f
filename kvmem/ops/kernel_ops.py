"""The two kernel calls the integrations make, with an optional forced backend.

``backend="auto"`` runs the backend the dispatcher picks (``kvmem.backends.select``), called
directly in eager mode (skipping the ~0.1 ms ``torch.library`` dispatch per call, which matters at
one call per layer per decode step) and through the public custom ops (``kvmem.cache_write`` /
``kvmem.paged_attention``) while ``torch.compile`` traces. A named backend (``"cpu"``, ``"cuda"``,
``"triton"``, ``"reference"``) is called directly, for this model only (unlike the process-wide
``KVMEM_BACKEND`` environment variable); a backend that cannot run a call raises, naming why.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["KernelOps", "check_backend"]


def check_backend(backend) -> str:
    """Validate a ``backend=`` argument; returns it normalised."""
    from kvmem import backends

    names = ("auto",) + tuple(backends.BY_NAME)
    if not isinstance(backend, str) or backend.strip().lower() not in names:
        raise ValueError(f"kvmem: backend must be one of {list(names)}, got {backend!r}")
    return backend.strip().lower()


class KernelOps:
    """``cache_write`` and ``paged_attention`` for one backend choice (see the module docstring)."""

    def __init__(self, backend: str = "auto"):
        self.backend = check_backend(backend)
        self._checked = set()

    def _forced(self, call):
        from kvmem import backends

        if self.backend == "auto":
            return backends.select(call)
        b = backends.BY_NAME[self.backend]
        if call not in self._checked:
            why = b.rejects(call)
            if why is not None:
                raise RuntimeError(f"kvmem: backend={self.backend!r} cannot run {call.op} here: {why[1]}")
            self._checked.add(call)
        return b

    def cache_write(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
        """Write ``k``/``v`` ``[T, Hkv, D]`` into the pools at ``slot_mapping`` ``[T]`` (-1 skips)."""
        if self.backend == "auto" and torch.compiler.is_compiling():
            import kvmem

            kvmem.cache_write(k, v, k_cache, v_cache, slot_mapping, check=False)
            return
        from kvmem import backends

        self._forced(backends.Call.cache_write(k, k_cache)).cache_write(k, v, k_cache, v_cache, slot_mapping)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, *, scale: Optional[float] = None,
                        window: Optional[int] = None, softcap: Optional[float] = None,
                        sink_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal paged attention of ``q`` ``[T, Hq, D]``; returns ``out`` ``[T, Hq, D]`` (q's dtype)."""
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        if self.backend == "auto" and torch.compiler.is_compiling():
            import kvmem

            return kvmem.paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                                         max_seqlen_k, scale=scale, causal=True, window=window, softcap=softcap,
                                         sink_logits=sink_logits, check=False)
        from kvmem import backends

        call = backends.Call.paged_attention(q, k_cache, v_cache, max_seqlen_q, window, softcap, sink_logits)
        b = self._forced(call)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        b.paged_attention(out, None, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                          max_seqlen_k, float(scale), True, window or 0, float(softcap or 0.0), sink_logits,
                          None, None)
        return out
