"""The kernel calls the integrations make, with an optional forced backend.

``backend="auto"`` runs the backend the dispatcher picks (``kvmem.backends.select``), called
directly in eager mode (skipping the ~0.1 ms ``torch.library`` dispatch per call, which matters at
one call per layer per decode step) and through the public custom ops (``kvmem.cache_write`` /
``kvmem.paged_attention``) while ``torch.compile`` traces. A named backend (``"cpu"``, ``"cuda"``,
``"triton"``, ``"reference"``) is called directly, for this model only (unlike the process-wide
``KVMEM_BACKEND`` environment variable); a backend that cannot run a call raises, naming why.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem import dispatch

__all__ = ["KernelOps", "check_backend"]


def check_backend(backend) -> str:
    """Validate a ``backend=`` argument; returns it normalised."""
    names = ("auto",) + tuple(dispatch.BY_NAME)
    if not isinstance(backend, str) or backend.strip().lower() not in names:
        raise ValueError(f"kvmem: backend must be one of {list(names)}, got {backend!r}")
    return backend.strip().lower()


class KernelOps:
    """``cache_write``, ``paged_attention``, ``merge_states`` and shared-prefix decode for one backend
    choice (see the module docstring).

    The arguments become the op's parameter object exactly as the public ops build it
    (``kvmem/ops/<op>/params.py``), so defaults live in one place."""

    def __init__(self, backend: str = "auto"):
        self.backend = check_backend(backend)
        self._checked = set()

    def _backend_for(self, call):
        if self.backend == "auto":
            return dispatch.select(call)
        b = dispatch.BY_NAME[self.backend]
        if call not in self._checked:
            why = b.rejects(call)
            if why is not None:
                raise RuntimeError(f"kvmem: backend={self.backend!r} cannot run {call.op} here: {why[1]}")
            self._checked.add(call)
        return b

    def _run(self, params) -> None:
        call = params.call()
        self._backend_for(call).run(call.op, params)

    def cache_write(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, *, k_scale: Optional[torch.Tensor] = None,
                    v_scale: Optional[torch.Tensor] = None) -> None:
        """Write ``k``/``v`` ``[T, Hkv, D]`` into the pools at ``slot_mapping`` ``[T]`` (-1 skips);
        with ``k_scale``/``v_scale`` (0-d or [Hkv] fp32) ``k / k_scale`` is stored (float8 caches)."""
        if self.backend == "auto" and torch.compiler.is_compiling():
            from kvmem.ops.cache_write import cache_write

            cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale, check=False)
            return
        from kvmem.ops.cache_write.params import CacheWriteParams

        self._run(CacheWriteParams(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale))

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, *, scale: Optional[float] = None,
                        window: Optional[int] = None, softcap: Optional[float] = None,
                        sink_logits: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                        v_scale: Optional[torch.Tensor] = None, causal: bool = True, return_lse: bool = False):
        """Paged attention of ``q`` ``[T, Hq, D]`` (causal unless told); returns ``out`` ``[T, Hq, D]``
        (q's dtype), or ``(out, lse)`` with ``return_lse``; ``k_scale``/``v_scale``: the pages'
        dequantisation scales (float8 caches)."""
        kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, sink_logits=sink_logits,
                  k_scale=k_scale, v_scale=v_scale, return_lse=return_lse)
        if self.backend == "auto" and torch.compiler.is_compiling():
            from kvmem.ops.paged_attention import paged_attention

            return paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                                         max_seqlen_k, check=False, **kw)
        from kvmem.ops.paged_attention.params import PagedAttentionParams

        params = PagedAttentionParams.build(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                            max_seqlen_q, max_seqlen_k, **kw)
        self._run(params)
        return (params.out, params.lse) if return_lse else params.out

    def merge_states(self, out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
        """``kvmem.merge_states`` on this backend choice; returns ``(out, lse)``."""
        if self.backend == "auto" and torch.compiler.is_compiling():
            from kvmem.ops.merge_states import merge_states

            return merge_states(out_a, lse_a, out_b, lse_b)
        from kvmem.ops.merge_states.params import MergeStatesParams

        params = MergeStatesParams.build(out_a, lse_a, out_b, lse_b)
        self._run(params)
        return params.out, params.lse

    def cascade_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan, *,
                       scale: float, softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
                       k_scale: Optional[torch.Tensor] = None,
                       v_scale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Shared-prefix decode (``kvmem.ops.cascade``) of ``q`` ``[rows, Hq, D]`` over ``plan`` (a
        ``CascadePlan``); returns ``out``, or None when a named backend cannot run one of its parts
        (logged once: the caller then runs plain decode; ``"auto"`` falls back per part itself)."""
        from kvmem.ops import cascade
        from kvmem.ops.paged_attention.params import describe_call

        if self.backend != "auto":
            calls = (describe_call(q, k_cache, v_cache, plan.rows, softcap=softcap, sink_logits=sink_logits,
                                   k_scale=k_scale, v_scale=v_scale),
                     describe_call(q, k_cache, v_cache, 1, softcap=softcap, k_scale=k_scale, v_scale=v_scale))
            for call in calls:
                why = dispatch.BY_NAME[self.backend].rejects(call)
                if why is not None:
                    key = ("cascade_decode", self.backend, why[1])
                    if key not in dispatch._logged:
                        dispatch._logged.add(key)
                        dispatch.logger.warning("kvmem: cascade_decode falls back to plain decode on %s: %s",
                                                self.backend, why[1])
                    return None
        out, _ = cascade.run(self.paged_attention, self.merge_states, q, k_cache, v_cache, plan, scale=scale,
                             softcap=softcap, sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale)
        return out
