"""``DecodeGraphRunner``: a patched model's decode steps as one static graph (CUDA graph or torch.compile).

>>> kvmem.patch(model, cuda_graph=True)     # generate(): decode steps captured once per batch size
>>> out = model.generate(**inputs, max_new_tokens=256)

How it works (vLLM's decode-graph runner, applied to a Hugging Face model)
--------------------------------------------------------------------------
``patch(model, cuda_graph=True)`` (or ``compile_decode=...``) wraps ``model.forward``. A call that
is a decode step of a ``PagedKVCache`` (one new token per row, the cache already prefilled, no
gradients, nothing asked for but logits) goes to the runner; every other call (prefill, assisted
decoding's multi-token steps, ``output_hidden_states``...) runs the original forward unchanged.

For a decode step the runner

1. enters ``cache.static_decode_step(attention_mask)``: the host plans the step and updates the
   cache's fixed-shape metadata buffers in place; the mask is checked on the device (no sync);
2. runs the model forward with ``attention_mask=None`` and ``position_ids [B, 1]`` (made from the
   cache length when the caller gave none), which is device work only:

   * on CUDA with ``cuda_graph=True``: the first step of a batch size runs for real on a side stream
     (warm-up: lazy initialisation, Triton compilation), then the forward is captured into a CUDA
     graph whose inputs are static ``input_ids``/``position_ids`` buffers; later steps copy their
     inputs in and replay. A graph lives as long as the metadata buffers (and pools) it points
     at: with ``patch(model, cuda_graph=True)`` those live in a ``KVPool`` kept across
     ``generate()`` calls, so later calls of the same batch size and ``max_length`` replay the
     first call's graphs; a cache of its own (``DecodeGraphRunner`` used directly) captures anew;
   * with ``compile=`` (``patch(..., compile_decode=...)``): the forward is
     ``torch.compile(fullgraph=True)``-d (one graph; compiled once per batch size and cache
     object's shapes, no recompiles between steps); combined with ``cuda_graph`` on CUDA, the
     compiled forward is what gets captured;
   * otherwise (CPU with ``cuda_graph=True``): the same static step runs eagerly;
3. returns the logits in a ``CausalLMOutputWithPast`` holding the cache, as the model would.

Prefill stays eager. Why a wrapper and not transformers' own ``compile_config``: transformers
compiles around ``Cache.is_compileable`` caches with 4D masks and static shapes of its own, and
would trace the prefill too; kvmem's planning is host code that must run outside the graph.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Optional

import torch

from kvmem.integrations.hf.cache import PagedKVCache
from kvmem.integrations.hf.compat import CACHE_KWARGS, cache_kwarg, causal_lm_output, kwargs_cache

__all__ = ["DecodeGraphRunner", "install", "uninstall"]

_MISSING = object()

# Keyword arguments a decode step may carry and still run static (generate() passes these).
_STEP_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", *CACHE_KWARGS, "use_cache",
                          "return_dict", "logits_to_keep", "output_attentions", "output_hidden_states",
                          "inputs_embeds", "cache_position"})


class _Captured:
    __slots__ = ("graph", "input_ids", "position_ids", "logits")

    def __init__(self, graph, input_ids, position_ids, logits):
        self.graph, self.input_ids, self.position_ids, self.logits = graph, input_ids, position_ids, logits


class DecodeGraphRunner:
    """Runs a kvmem-patched model's one-token decode steps with static metadata (see the module docstring).

    Parameters
    ----------
    model: a model patched with ``kvmem.patch`` (its attention is ``"kvmem"``)
    cuda_graph: capture decode steps on CUDA in CUDA graphs (once per batch size and metadata
        buffers) and replay them; ignored on other devices (the static step runs eagerly or compiled)
    compile: None, True, or a dict of ``torch.compile`` keyword arguments for the decode forward
        (``fullgraph=True`` is the default; e.g. ``{"backend": "inductor"}``). For CUDA graphs use
        ``cuda_graph=True`` rather than ``mode="reduce-overhead"``: the step writes the KV pools in
        place, which torch's own CUDA-graph trees decline for inputs that are not static.

    Attributes
    ----------
    stats: counts of decode steps by how they ran: ``"eager_static"``, ``"compiled"``,
        ``"captured"`` (first step of a batch size: warm-up run + capture), ``"replayed"``
    """

    def __init__(self, model, *, cuda_graph: bool = True, compile=None):
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"kvmem: cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if compile is True:
            compile = {}
        elif compile is False:
            compile = None
        if compile is not None and not isinstance(compile, dict):
            raise TypeError(f"kvmem: compile must be None, a bool or a dict of torch.compile options, got "
                            f"{type(compile).__name__}")
        self.model = model
        self.cuda_graph = cuda_graph
        self.compile_options = None if compile is None else {"fullgraph": True, **compile}
        self._forward = model.forward  # the forward this runner wraps (bound)
        self._cache_kw = cache_kwarg(model)
        self._compiled = None
        # StaticDecodeBuffers -> {key: graph}: a graph lives as long as the buffers (and pools) it points at
        self._graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._mempool = None
        self._uncapturable = set()  # graph keys whose capture failed: those steps run uncaptured
        self.stats = {"eager_static": 0, "compiled": 0, "captured": 0, "replayed": 0}

    def __repr__(self) -> str:
        n = sum(len(g) for g in self._graphs.values())
        return (f"DecodeGraphRunner(cuda_graph={self.cuda_graph}, compile={self.compile_options}, "
                f"graphs={n}, stats={self.stats})")

    # ------------------------------------------------------------------ public
    def decode_step(self, input_ids: torch.Tensor, cache: PagedKVCache, *,
                    attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                    logits_to_keep: Optional[int] = None) -> torch.Tensor:
        """One static decode step of a prefilled ``cache``.

        Parameters
        ----------
        input_ids: [B, 1] the rows' new tokens
        cache: the ``PagedKVCache`` holding the rows (B of them)
        attention_mask: None or the 2D mask [B, seen + 1] (checked on the device only)
        position_ids: [B, 1] (default: ``cache.get_seq_length()`` for every row)
        logits_to_keep: passed to the model forward when given

        Returns
        -------
        logits: [B, 1, vocab] (a fresh tensor)
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"kvmem: a decode step takes input_ids [batch, 1], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        B = input_ids.shape[0]
        if position_ids is None:
            position_ids = torch.full((B, 1), cache.get_seq_length(), dtype=torch.long, device=input_ids.device)
        elif position_ids.dim() != 2 or position_ids.shape[-1] != 1 or position_ids.shape[0] not in (1, B):
            raise ValueError(f"kvmem: a decode step takes position_ids [batch, 1], got {tuple(position_ids.shape)}")
        elif position_ids.shape[0] != B:
            position_ids = position_ids.expand(B, 1)
        if not position_ids.is_contiguous():
            position_ids = position_ids.contiguous()
        if not input_ids.is_contiguous():
            input_ids = input_ids.contiguous()
        with cache.static_decode_step(attention_mask) as st:
            if self.cuda_graph and st.device.type == "cuda":
                return self._graph_step(st, input_ids, position_ids, cache, logits_to_keep)
            if self.compile_options is not None:
                self.stats["compiled"] += 1
                return self._compiled_fn()(input_ids, position_ids, cache, logits_to_keep)
            self.stats["eager_static"] += 1
            return self._run_model(input_ids, position_ids, cache, logits_to_keep)

    def reset(self) -> None:
        """Drop captured graphs and the compiled function."""
        self._graphs = weakref.WeakKeyDictionary()
        self._compiled = None

    # ------------------------------------------------------------------ forward wrapper
    def step_cache(self, args, kwargs) -> Optional[PagedKVCache]:
        """The ``PagedKVCache`` when a forward call is a decode step the runner can take, else None."""
        if args or not kwargs.keys() <= _STEP_KWARGS or torch.is_grad_enabled():
            return None
        ids = kwargs.get("input_ids")
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1
                or kwargs.get("inputs_embeds") is not None or kwargs.get("cache_position") is not None):
            return None
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        lk = kwargs.get("logits_to_keep")
        if lk is not None and (isinstance(lk, bool) or not isinstance(lk, int)):
            return None
        cache = kwargs_cache(kwargs)
        if not isinstance(cache, PagedKVCache) or cache.batch_size != ids.shape[0] or cache.get_seq_length() == 0:
            return None
        if cache.pools_device() is None:
            return None  # a model split over devices: eager steps
        return cache

    def forward(self, *args, **kwargs):
        """``model.forward`` of a model this runner is installed on."""
        cache = self.step_cache(args, kwargs)
        if cache is None:
            return self._forward(*args, **kwargs)
        logits = self.decode_step(kwargs["input_ids"], cache, attention_mask=kwargs.get("attention_mask"),
                                  position_ids=kwargs.get("position_ids"), logits_to_keep=kwargs.get("logits_to_keep"))
        return causal_lm_output(logits, self._cache_kw, cache)

    # ------------------------------------------------------------------ internals
    def _run_model(self, input_ids, position_ids, cache, logits_to_keep):
        """The device half of a decode step: the model forward over the cache's static buffers."""
        kw = {self._cache_kw: cache}
        if logits_to_keep is not None:
            kw["logits_to_keep"] = logits_to_keep
        out = self._forward(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=True,
                            return_dict=True, **kw)
        return out.logits

    def _compiled_fn(self):
        if self._compiled is None:
            self._compiled = torch.compile(self._run_model, **self.compile_options)
        return self._compiled

    def _graph_step(self, st, input_ids, position_ids, cache, logits_to_keep):
        fn = self._run_model if self.compile_options is None else self._compiled_fn()
        graphs = self._graphs.setdefault(st, {})
        key = (logits_to_keep, input_ids.dtype, position_ids.dtype)
        g = graphs.get(key)
        if g is not None:
            g.input_ids.copy_(input_ids, non_blocking=True)
            g.position_ids.copy_(position_ids, non_blocking=True)
            g.graph.replay()
            self.stats["replayed"] += 1
            return g.logits.clone()
        if key in self._uncapturable:
            self.stats["eager_static"] += 1
            return fn(input_ids, position_ids, cache, logits_to_keep)
        # First step of this batch size: run it for real on a side stream (lazy init, Triton compiles),
        # then capture the same forward (capturing records kernels without running them).
        dev = st.device
        static_ids, static_pos = input_ids.clone(), position_ids.clone()
        main = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = fn(static_ids, static_pos, cache, logits_to_keep)
        main.wait_stream(side)
        logits.record_stream(main)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._mempool):
                out = fn(static_ids, static_pos, cache, logits_to_keep)
        except Exception as e:  # e.g. a model whose forward syncs (data-dependent MoE routing on the host)
            self._uncapturable.add(key)
            warnings.warn(f"kvmem: could not capture {type(self.model).__name__}'s decode step in a CUDA graph "
                          f"({type(e).__name__}: {e}); its decode steps run static but uncaptured", RuntimeWarning)
            self.stats["eager_static"] += 1
            return logits
        graphs[key] = _Captured(graph, static_ids, static_pos, out)
        self.stats["captured"] += 1
        return logits


def install(model, *, cuda_graph: bool = True, compile=None) -> DecodeGraphRunner:
    """Put a ``DecodeGraphRunner`` in front of ``model.forward`` (``kvmem.patch(..., cuda_graph=True)``).

    The wrapper keeps the forward's signature (``functools.wraps``), so transformers' signature
    checks (``logits_to_keep``, the cache keyword) see the original.
    """
    runner = DecodeGraphRunner(model, cuda_graph=cuda_graph, compile=compile)
    runner._saved_forward = model.__dict__.get("forward", _MISSING)  # e.g. accelerate's hook wrapper

    @functools.wraps(runner._forward)
    def forward(*args, **kwargs):
        return runner.forward(*args, **kwargs)

    model.forward = forward
    model._kvmem_runner = runner
    return runner


def uninstall(model) -> None:
    """Undo ``install`` (no-op without a runner)."""
    runner = model.__dict__.pop("_kvmem_runner", None)
    if runner is not None:
        runner.reset()
        saved = getattr(runner, "_saved_forward", _MISSING)
        if saved is _MISSING:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved
