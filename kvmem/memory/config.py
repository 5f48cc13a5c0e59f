"""``MemoryConfig``: how a memory bank serves a model's full-attention layers.

All sizes are in tokens. ``sink_tokens`` and ``window`` are whole blocks; ``block_size`` is the
pool's page size or a multiple of it; ``top_k`` counts blocks; ``top_k=0`` is a block-granular
StreamingLLM (sinks + window).

Positions (extend mode)
-----------------------
Keys are cached before RoPE and rotated on load at *compacted* positions (cache order with the
evicted, unselected blocks removed; ``kvmem.ops.memory_attention.reference``). The local window
starts at block ``w0 = max(sink_blocks, (L_start - window) // block_size)``, so it holds fewer than
``window + block_size`` keys before a chunk of at most ``chunk_size`` queries, and every distance
a query sees is below::

    max_distance = sink_tokens + top_k * block_size + window + block_size + chunk_size

Extend mode requires ``max_distance <= trained_context`` (the model config's
``max_position_embeddings``); the defaults keep it within half of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["MemoryConfig", "MODES", "SUMMARIES", "SUPPORTED_ROPE_TYPES", "trained_context"]

MODES = ("exact", "extend")
SUMMARIES = ("minmax", "box", "reps", "mean")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DEFAULT_SINK_TOKENS = 64
DEFAULT_MAX_CHUNK = 512


def _fail(arg: str, expected: str, got, exc=ValueError):
    raise exc(f"MemoryConfig: argument '{arg}' must be {expected}, got {got!r}")


def _count(arg: str, value, *, minimum: int = 0):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(arg, "None or an int", type(value).__name__, TypeError)
    if value < minimum:
        _fail(arg, f"None or an int >= {minimum}", value)


def _text_config(model_config):
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def trained_context(model_config) -> int:
    """The longest context the model was trained (or RoPE-scaled) for: ``max_position_embeddings``."""
    config = _text_config(model_config)
    length = getattr(config, "max_position_embeddings", None)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"MemoryConfig.resolve: the model config has no positive max_position_embeddings "
                         f"(got {length!r}); pass every size explicitly in exact mode")
    return length


def _rope_type(model_config) -> Optional[str]:
    """The model's RoPE type, or None for a family without rotary embeddings."""
    config = _text_config(model_config)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict):
        if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (e.g. Gemma3)
            params = next(iter(params.values()))
        return params.get("rope_type", params.get("type", "default"))
    if getattr(config, "rope_theta", None) is not None:
        return "default"
    return None


@dataclass(frozen=True)
class MemoryConfig:
    """Sinks + top-k bank blocks + local window, per full-attention layer.

    Parameters
    ----------
    mode: ``"extend"`` (pre-RoPE keys rotated at compacted positions: context extension past the
        trained length) or ``"exact"`` (keys as HF cached them: sparse attention inside it)
    sink_tokens: attention-sink tokens kept at the start of every row (whole blocks)
    window: local-window tokens (whole blocks, >= one block)
    block_size: tokens per bank block: the page size (default) or a multiple of it
    top_k: bank blocks selected per (row, KV head) and step
    summary: block summary used for selection (``kvmem.ops.memory_select.reference``): ``"mean"``
        (the block's mean key; the default, the best measured on SmolLM2), ``"minmax"`` (Quest's
        channel-wise bound), ``"box"`` (ArkVale) or ``"reps"`` (two representative keys)
    chunk_size: prefill chunk (queries per step); selection runs once per chunk
    dense_layers: the first N full-attention layers keep full attention
    selection: the selection policy (``kvmem.memory.policies``): a ``SelectionPolicy`` or a name
        (``"mean"``, ``"minmax"``/``"quest"``, ``"reps"``/``"infllm"``, ``"box"``, ``"streaming"``);
        default the built-in of ``summary``. ``summary`` then becomes the policy's summary kind
        (a ``summary`` other than the default that disagrees is an error); ``"streaming"``
        (``StreamingLLM()``) needs ``top_k`` 0 or None (resolved to 0)
    eviction: an ``EvictionPolicy`` (e.g. ``HeavyHitters(budget_blocks)``) applied to every row's
        bank once per step, or None (banks only grow)

    ``None`` sizes are derived from the model by ``resolve(model_config, page_size)``.
    """

    mode: str = "extend"
    sink_tokens: Optional[int] = None
    window: Optional[int] = None
    block_size: Optional[int] = None
    top_k: Optional[int] = None
    summary: str = "mean"
    chunk_size: Optional[int] = None
    dense_layers: int = 0
    selection: Any = None
    eviction: Any = None

    def __post_init__(self):
        if self.mode not in MODES:
            _fail("mode", f"one of {MODES}", self.mode)
        if self.summary not in SUMMARIES:
            _fail("summary", f"one of {SUMMARIES}", self.summary)
        self._set_policies()
        _count("sink_tokens", self.sink_tokens)
        _count("window", self.window, minimum=1)
        _count("block_size", self.block_size, minimum=1)
        _count("top_k", self.top_k)
        _count("chunk_size", self.chunk_size, minimum=1)
        _count("dense_layers", self.dense_layers)
        if self.dense_layers is None:
            _fail("dense_layers", "an int >= 0", None, TypeError)
        if self.block_size is not None:
            self._check_whole_blocks(self.block_size)

    def _set_policies(self):
        from kvmem.memory import policies

        selection = policies.selection_policy(self.summary if self.selection is None else self.selection)
        kind = selection.summary
        if kind is not None:
            if kind not in SUMMARIES:
                _fail("selection", f"a policy whose summary is one of {SUMMARIES} or None",
                      f"{selection.name} with summary={kind!r}")
            if self.selection is not None and self.summary not in (kind, "mean"):
                _fail("summary", f"the selection policy's summary {kind!r} ({selection.name}), or left unset",
                      self.summary)
            object.__setattr__(self, "summary", kind)
        if not selection.selects_blocks and self.top_k not in (None, 0):
            _fail("top_k", f"0 or None with selection={selection.name} (it selects no bank block)", self.top_k)
        if self.eviction is not None and not isinstance(self.eviction, policies.EvictionPolicy):
            _fail("eviction", "None or a kvmem.memory.EvictionPolicy (e.g. HeavyHitters(budget_blocks))",
                  self.eviction, TypeError)
        for arg, policy in (("selection", selection), ("eviction", self.eviction)):
            try:
                hash(policy)
            except TypeError:
                _fail(arg, "hashable (MemoryConfig is hashed): a plain class or a frozen dataclass",
                      type(policy).__name__, TypeError)
        object.__setattr__(self, "selection", selection)

    @property
    def needs_mass(self) -> bool:
        """Some policy reads attention mass: the memory attention collects ``block_mass``."""
        return bool(self.selection.needs_mass or (self.eviction is not None and self.eviction.needs_mass))

    def _check_whole_blocks(self, block_size: int):
        for arg in ("sink_tokens", "window"):
            value = getattr(self, arg)
            if value is not None and value % block_size:
                _fail(arg, f"whole blocks: a multiple of block_size={block_size} "
                      f"(e.g. {max(block_size, value // block_size * block_size)})", value)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.sink_tokens, self.window, self.block_size, self.top_k, self.chunk_size)

    @property
    def sink_blocks(self) -> int:
        return self._resolved("sink_blocks").sink_tokens // self.block_size

    @property
    def max_distance(self) -> int:
        """``sink_tokens + top_k * block_size + window + block_size + chunk_size``: bounds every
        compacted query-key distance (and the RoPE table's length) in extend mode."""
        self._resolved("max_distance")
        return self.sink_tokens + self.top_k * self.block_size + self.window + self.block_size + self.chunk_size

    def _resolved(self, what: str) -> "MemoryConfig":
        if not self.is_resolved:
            raise ValueError(f"MemoryConfig.{what}: the config has unset sizes; call resolve(model_config, page_size)")
        return self

    def resolve(self, model_config, page_size: int) -> "MemoryConfig":
        """Every size set, derived from the model where not given, and checked against it.

        Defaults, with ``C = max_position_embeddings`` and ``bs = block_size`` (default the page
        size): ``sink_tokens = 64`` (rounded up to whole blocks, at most ``C/16``),
        ``chunk_size = min(512, C/16)``, ``window = C/8`` (whole blocks), and ``top_k`` the
        blocks that fit the rest of half the trained context:
        ``(C/2 - sink_tokens - window - bs - chunk_size) // bs`` (>= 0).
        For SmolLM2 (C = 8192, pages of 16): 64 sinks, window 1024, chunk 512, top_k 155.

        Parameters
        ----------
        model_config: a transformers ``PretrainedConfig`` (its text config is used)
        page_size: tokens per page of the KV pool

        Raises
        ------
        TypeError, ValueError: naming the argument and the expected value
        """
        _count("page_size", page_size, minimum=1)
        block_size = self.block_size if self.block_size is not None else page_size
        if block_size % page_size:
            _fail("block_size", f"the page size {page_size} or a multiple of it", block_size)
        self._check_whole_blocks(block_size)
        rope = _rope_type(model_config)
        if self.mode == "extend":
            if rope is None:
                raise ValueError("MemoryConfig: mode='extend' needs a model with rotary position embeddings "
                                 f"(its config has no rope_parameters); use mode='exact' for "
                                 f"{type(model_config).__name__}")
            if rope not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"MemoryConfig: mode='extend' supports RoPE types {SUPPORTED_ROPE_TYPES}, "
                                 f"got rope_type={rope!r}; use mode='exact'")
        context = trained_context(model_config)

        def blocks_down(tokens: int) -> int:
            return max(block_size, tokens // block_size * block_size)

        sinks = self.sink_tokens
        if sinks is None:
            sinks = -(-min(DEFAULT_SINK_TOKENS, max(1, context // 16)) // block_size) * block_size
        window = self.window if self.window is not None else blocks_down(context // 8)
        chunk = self.chunk_size if self.chunk_size is not None else max(1, min(DEFAULT_MAX_CHUNK, context // 16))
        top_k = self.top_k
        if top_k is None and not self.selection.selects_blocks:
            top_k = 0
        if top_k is None:
            top_k = max(0, (context // 2 - sinks - window - block_size - chunk) // block_size)
        resolved = dataclasses.replace(self, sink_tokens=sinks, window=window, block_size=block_size,
                                       top_k=top_k, chunk_size=chunk)
        if self.mode == "extend" and resolved.max_distance > context:
            raise ValueError(
                f"MemoryConfig: in extend mode the largest remapped distance sink_tokens + top_k*block_size "
                f"+ window + block_size + chunk_size = {sinks} + {top_k}*{block_size} + {window} + {block_size} "
                f"+ {chunk} = {resolved.max_distance} must be <= the trained context {context} "
                f"(max_position_embeddings); lower top_k, window or chunk_size")
        layers = getattr(_text_config(model_config), "num_hidden_layers", None)
        if isinstance(layers, int) and self.dense_layers > layers:
            _fail("dense_layers", f"<= the model's num_hidden_layers={layers}", self.dense_layers)
        return resolved
