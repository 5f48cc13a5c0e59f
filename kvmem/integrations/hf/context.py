"""The step context: how a ``PagedKVCache`` step hands a layer's keys to kvmem's attention function.

HF's attention modules call ``cache.update(k, v, layer_idx)`` and then the registered attention
function with what ``update`` returned, but they pass the function neither the cache nor the step.
The hand-over is therefore one explicit object, the ``StepContext`` of the step in flight, and one
thread-local slot naming it (``current()``; the only thread-local of the integration):

* an eager step: ``update`` stashes the layer's ``(k, v)`` in ``StepContext.pending`` and makes the
  context current; the attention function takes the stash back with ``take(layer_idx, key)``
  (only the very tensor ``update`` returned counts: a model with another cache in the same thread
  that runs after a step stopped half-way never takes a stale stash) and the cache plans, writes
  and attends (``PagedKVCache.attend_layer``). The slot is cleared when the step's last layer has
  attended.
* a static decode step (``PagedKVCache.static_decode_step``): the host half makes a context with
  the step's ``StaticDecodeBuffers`` current before the forward and clears it after; inside, the
  attention function runs ``run_static`` (device work only; torch.compile traces the slot's read
  and guards on it like on any attribute).

Thread-local, so that a forward of another model in another thread never takes this step's path.
The context also carries what the layer stages (``kvmem.layer``) read: the step's plan, the
per-layer position embeddings the attention modules applied (``position_embeddings``, recorded by
``kvmem.patch``'s pre-hooks; a model given ``attn_implementation="kvmem"`` without ``kvmem.patch``
records none; in a CUDA-graph replay no Python runs, and the record holds the captured graph's
tensors, which each replay rewrites in place) and, later, the memory bank's selections.
"""

from __future__ import annotations

import threading
import weakref
from typing import Dict, Optional, Set, Tuple

import torch

from kvmem.cache.static import StaticDecodeBuffers
from kvmem.layer import LayerAttention, LayerContext, run_layer, tokens

__all__ = ["StepContext", "current", "enter", "leave"]

_tls = threading.local()  # .step: the StepContext in flight in this thread (see the module docstring)


def current() -> Optional["StepContext"]:
    """The ``StepContext`` in flight in this thread, or None."""
    return getattr(_tls, "step", None)


def enter(ctx: "StepContext") -> None:
    """Make ``ctx`` this thread's step in flight."""
    _tls.step = ctx


def leave(ctx: "StepContext") -> None:
    """Clear the slot if it names ``ctx``."""
    if getattr(_tls, "step", None) is ctx:
        _tls.step = None


class StepContext:
    """One forward step of a ``PagedKVCache``.

    Parameters
    ----------
    cache: the ``PagedKVCache`` (held by weak reference: a context left in the slot never keeps
        pools alive)
    batch, q_len: the step's rows and new tokens per row
    ops: the cache's ``KernelOps``
    position_embeddings: layer -> ``(cos, sin)``, the cache's record (shared dict)
    static: the ``StaticDecodeBuffers`` of a static decode step, else None

    Attributes
    ----------
    updated: layers whose ``update`` ran this step
    pending: layer -> ``(k, v)`` returned by ``update`` and not yet attended
    done: layers attended (written + attention run)
    plan: the ``StepPlan``, once planned
    index: [num_real] int64 indices of the real tokens in ``[B*S]``, None = all real
    prev_lens: per row KV lengths before the step (for rollback)
    selections: layer -> what a select stage chose (the memory bank's, later)
    memory: the step's ``kvmem.memory.step.MemoryStep`` (a memory-bank cache), else None
    """

    __slots__ = ("_cache", "batch", "q_len", "ops", "static", "updated", "pending", "done", "plan", "index",
                 "prev_lens", "position_embeddings", "selections", "memory")

    def __init__(self, cache, batch: int, q_len: int, ops, position_embeddings: Dict[int, Tuple],
                 static: Optional[StaticDecodeBuffers] = None):
        self._cache = weakref.ref(cache)
        self.batch, self.q_len, self.ops, self.static = batch, q_len, ops, static
        self.updated: Set[int] = set()
        self.pending: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.done: Set[int] = set()
        self.plan = None
        self.index: Optional[torch.Tensor] = None
        self.prev_lens = None
        self.position_embeddings = position_embeddings
        self.selections: Dict[int, object] = {}
        self.memory = None

    @property
    def cache(self):
        """The ``PagedKVCache`` (None if it is gone)."""
        return self._cache()

    def take(self, layer_idx, key: torch.Tensor) -> bool:
        """Whether ``key`` is what ``update`` returned for ``layer_idx`` in this step (still pending)."""
        kv = self.pending.get(layer_idx)
        return kv is not None and kv[0] is key

    def layer_context(self, layer_idx: int) -> LayerContext:
        """The ``LayerContext`` the layer stages read."""
        return LayerContext(layer_idx, self.position_embeddings.get(layer_idx), self.selections.get(layer_idx))

    def run_static(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention: LayerAttention) -> torch.Tensor:
        """One layer of a static decode step (device work only).

        Parameters
        ----------
        query: [rows, Hq, 1, D]; key, value: [rows, Hkv, 1, D] (what ``update`` returned)

        Returns
        -------
        out: [rows, 1, Hq, D]
        """
        st = self.static
        if attention.window != st.layer_window[layer_idx]:
            raise ValueError(f"kvmem: layer {layer_idx} attends with sliding_window={attention.window} but this "
                             f"PagedKVCache was built with window {st.layer_window[layer_idx]} for it")
        B, Hq, S, D = query.shape
        k_cache, v_cache = st.pools[layer_idx]
        ks, vs = st.scales.get(layer_idx, (None, None))
        k = tokens(key)
        mu = st.centers.get(layer_idx)
        if mu is not None:  # centred keys (kvmem.cache.scales), fixed by the prefill
            k = (k.float() - mu).to(k.dtype)
        out = run_layer(self.ops, tokens(query), k, tokens(value), k_cache, v_cache, st.metadata(layer_idx),
                        attention, self.layer_context(layer_idx), k_scale=ks, v_scale=vs)
        return out.view(B, S, Hq, D)
