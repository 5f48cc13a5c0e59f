"""Backends and the dispatcher.

Each backend declares what it can run (device, dtypes, head dims, page sizes, features); the
dispatcher tries them fastest first — cuda, triton, cpu, reference — and runs the first that
accepts the call. ``KVMEM_BACKEND=cuda|triton|cpu|reference`` forces one (an error if it cannot
run the call). :func:`explain` says, for a call, why each backend was taken or rejected.

A rejection is either *inapplicable* (wrong device, not built, not installed: silent) or a
*fallback* (the backend runs on this device but not this feature/shape: logged once per reason,
as one line on the ``kvmem`` logger).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from kvmem import _ext, verified
from kvmem.ops import reference

logger = logging.getLogger("kvmem")

OPS = ("cache_write", "paged_attention", "merge_states")
FEATURES = ("window", "softcap", "sink_logits", "kv_scale", "rope")
DECODE_MAX_Q = 16  # longest query segment a decode-style (one row per query token) kernel takes


def _aligned_16(t: torch.Tensor) -> bool:
    if t.data_ptr() % 16:
        return False
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])


@dataclass(frozen=True)
class Call:
    """What the dispatcher needs to know about one op call (hashable, so choices are cached)."""

    op: str
    device_type: str
    dtype: torch.dtype
    head_dim: int
    block_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    cache_dtype: Optional[torch.dtype] = None
    features: FrozenSet[str] = field(default_factory=frozenset)
    decode: bool = True  # every query segment is short (<= DECODE_MAX_Q): a decode-style kernel fits
    aligned: bool = True  # rows of q and the caches start on 16-byte boundaries

    @staticmethod
    def paged_attention(q, k_cache, v_cache=None, max_seqlen_q=1, window=None, softcap=None,
                        sink_logits=None, k_scale=None, rope_cos_sin=None) -> "Call":
        feats = {name for name, v in (("window", window), ("softcap", softcap), ("sink_logits", sink_logits),
                                      ("kv_scale", k_scale), ("rope", rope_cos_sin)) if v is not None}
        tensors = (q, k_cache) if v_cache is None else (q, k_cache, v_cache)
        return Call("paged_attention", q.device.type, q.dtype, q.shape[-1], k_cache.shape[1],
                    q.shape[1], k_cache.shape[2], k_cache.dtype, frozenset(feats),
                    max_seqlen_q <= DECODE_MAX_Q, all(_aligned_16(t) for t in tensors))

    @staticmethod
    def cache_write(k, k_cache, k_scale=None) -> "Call":
        return Call("cache_write", k_cache.device.type, k.dtype, k.shape[-1], k_cache.shape[1],
                    0, k_cache.shape[2], k_cache.dtype,
                    frozenset({"kv_scale"}) if k_scale is not None else frozenset())

    @staticmethod
    def merge_states(out_a) -> "Call":
        return Call("merge_states", out_a.device.type, out_a.dtype, out_a.shape[-1], 0, out_a.shape[1])


# (kind, reason): kind is "inapplicable" (silent) or "fallback" (logged once)
Rejection = Optional[Tuple[str, str]]


class Backend:
    """One implementation of the ops. Subclasses fill in capability checks and the three ops."""

    name = "?"

    def rejects(self, call: Call) -> Rejection:
        raise NotImplementedError

    # The three ops in out-parameter form (arguments already validated). The quantisation scales
    # and RoPE-on-load arguments reach only backends whose capability check accepts them.
    def cache_write(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        raise NotImplementedError

    def paged_attention(self, out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                        max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                        k_scale, v_scale, rope_cos_sin=None, rope_neox=True):
        raise NotImplementedError

    def merge_states(self, out, lse, out_a, lse_a, out_b, lse_b):
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The pure-PyTorch specification: runs everything, anywhere, slowly."""

    name = "reference"

    def rejects(self, call):
        return None

    def cache_write(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        reference.cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def paged_attention(self, out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                        max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                        k_scale, v_scale, rope_cos_sin=None, rope_neox=True):
        o, l = reference.paged_attention(
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
            scale=scale, causal=causal, window=window if window > 0 else None,
            softcap=softcap if softcap > 0 else None, sink_logits=sink_logits,
            k_scale=k_scale, v_scale=v_scale, rope_cos_sin=rope_cos_sin, rope_neox=rope_neox)
        out.copy_(o)
        if lse is not None:
            lse.copy_(l)

    def merge_states(self, out, lse, out_a, lse_a, out_b, lse_b):
        o, l = reference.merge_states(out_a, lse_a, out_b, lse_b)
        out.copy_(o)
        lse.copy_(l)


class CompiledBackend(Backend):
    """Ops from the compiled extension ``torch.ops.kvmem_C`` for one device type."""

    device_type = "?"
    max_head_dim = 256
    unsupported_features: FrozenSet[str] = frozenset()

    def rejects(self, call):
        if call.device_type != self.device_type:
            return ("inapplicable", f"runs on {self.device_type} tensors, not {call.device_type}")
        if not _ext.has_kernel(call.op, self.device_type):
            err = _ext.load_error() or f"kvmem_C::{call.op} has no {self.device_type} kernel in this build"
            return ("inapplicable", f"{err}; {_ext.BUILD_HINT}")
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return ("fallback", f"dtype {call.dtype} not compiled")
        if call.cache_dtype is not None and call.cache_dtype != call.dtype:
            return ("fallback", f"cache dtype {call.cache_dtype} differs from q dtype {call.dtype}")
        if call.head_dim > self.max_head_dim:
            return ("fallback", f"head_dim {call.head_dim} > {self.max_head_dim}")
        missing = call.features & self.unsupported_features
        if missing:
            return ("fallback", f"feature(s) {sorted(missing)} not implemented")
        return None

    def cache_write(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        _ext.get_op("cache_write")(k, v, k_cache, v_cache, slot_mapping)

    def paged_attention(self, out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                        max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                        k_scale, v_scale, rope_cos_sin=None, rope_neox=True):
        _ext.get_op("paged_attention")(out, lse, q, k_cache, v_cache, block_table, seq_lens,
                                       cu_seqlens_q, max_seqlen_q, max_seqlen_k, scale, causal,
                                       window, softcap, sink_logits)

    def merge_states(self, out, lse, out_a, lse_a, out_b, lse_b):
        _ext.get_op("merge_states")(out, lse, out_a, lse_a, out_b, lse_b)


class CpuBackend(CompiledBackend):
    """C++ kernels (OpenMP), csrc/cpu."""

    name = "cpu"
    device_type = "cpu"
    unsupported_features = frozenset({"kv_scale", "rope"})


class CudaBackend(CompiledBackend):
    """Hand-written CUDA kernels, csrc/cuda. Chosen by default only for configurations that the
    committed verified record (kvmem/verified/cuda.json, written by benchmarks/gpu_check.sh) lists
    as passing on this GPU architecture; ``KVMEM_BACKEND=cuda`` forces it."""

    name = "cuda"
    device_type = "cuda"
    unsupported_features = frozenset({"kv_scale", "rope"})
    head_dims = (64, 80, 96, 112, 128, 256)
    dtypes = (torch.float16, torch.bfloat16)

    def rejects(self, call):
        why = super().rejects(call)
        if why is not None:
            return why
        if call.op == "paged_attention":
            if call.dtype not in self.dtypes:
                return ("fallback", f"paged_attention kernels are built for fp16/bf16, not {call.dtype}")
            if call.head_dim not in self.head_dims:
                return ("fallback", f"head_dim {call.head_dim} not in the built {self.head_dims}")
            if not call.decode:
                return ("fallback", f"query segments longer than {DECODE_MAX_Q} (prefill) go to the prefill kernels")
            if not call.aligned:
                return ("fallback", "q/cache rows not 16-byte aligned")
        if _forced() != "cuda":
            arch = _cuda_arch()
            if not verified.is_verified("cuda", arch, call):
                return ("inapplicable", f"not in the verified record for {arch} "
                                        "(run benchmarks/gpu_check.sh; KVMEM_BACKEND=cuda forces it)")
        return None


def _cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


class TritonBackend(Backend):
    """Triton kernels, kvmem/ops/triton (imported lazily). On CPU tensors only when forced
    together with ``TRITON_INTERPRET=1`` (the interpreter is for testing, not speed)."""

    name = "triton"

    @functools.cached_property
    def _module(self):
        try:
            import triton  # noqa: F401
            from kvmem.ops import triton as kvmem_triton
        except ImportError as e:
            return e
        return kvmem_triton

    def rejects(self, call):
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if call.device_type != "cuda" and not (interpret and call.device_type == "cpu" and _forced() == "triton"):
            return ("inapplicable", f"runs on cuda tensors, not {call.device_type} "
                                    "(on CPU only with TRITON_INTERPRET=1 and KVMEM_BACKEND=triton)")
        mod = self._module
        if isinstance(mod, Exception):
            return ("inapplicable", f"triton kernels not importable ({mod}); pip install triton")
        missing = call.features & {"kv_scale", "rope"}
        if missing:
            return ("fallback", f"feature(s) {sorted(missing)} not implemented")
        if call.cache_dtype is not None and call.cache_dtype != call.dtype:
            return ("fallback", f"cache dtype {call.cache_dtype} differs from q dtype {call.dtype}")
        if call.op == "paged_attention":
            reason = mod.supports(call.dtype, call.head_dim, call.block_size, call.num_heads, call.num_kv_heads)
            if reason:
                return ("fallback", reason)
        return None

    def cache_write(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        self._module.cache_write(k, v, k_cache, v_cache, slot_mapping)

    def paged_attention(self, out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                        max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                        k_scale, v_scale, rope_cos_sin=None, rope_neox=True):
        self._module.paged_attention(out, lse, q, k_cache, v_cache, block_table, seq_lens,
                                     cu_seqlens_q, max_seqlen_q, max_seqlen_k, scale, causal,
                                     window, softcap, sink_logits)

    def merge_states(self, out, lse, out_a, lse_a, out_b, lse_b):
        self._module.merge_states(out, lse, out_a, lse_a, out_b, lse_b)


BACKENDS: List[Backend] = [CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend()]
BY_NAME: Dict[str, Backend] = {b.name: b for b in BACKENDS}


def _forced() -> Optional[str]:
    name = os.environ.get("KVMEM_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BY_NAME:
        raise ValueError(f"KVMEM_BACKEND must be one of auto, {', '.join(BY_NAME)}; got {name!r}")
    return name


_logged: set = set()


@functools.lru_cache(maxsize=4096)
def _select(call: Call, forced: Optional[str]) -> Backend:
    if forced is not None:
        backend = BY_NAME[forced]
        why = backend.rejects(call)
        if why is not None:
            raise RuntimeError(f"KVMEM_BACKEND={forced} cannot run {call.op} here: {why[1]}")
        return backend
    fallbacks = []
    for backend in BACKENDS:
        why = backend.rejects(call)
        if why is None:
            for name, reason in fallbacks:
                key = (call, name)
                if key not in _logged:
                    _logged.add(key)
                    logger.warning("kvmem: %s falls back from %s to %s: %s", call.op, name, backend.name, reason)
            return backend
        if why[0] == "fallback":
            fallbacks.append((backend.name, why[1]))
    raise AssertionError("the reference backend accepts every call")


def select(call: Call) -> Backend:
    """The backend that runs ``call`` (cached per call signature and KVMEM_BACKEND)."""
    return _select(call, _forced())


def explain(call: Call) -> Dict[str, str]:
    """For each backend, fastest first: 'selected', 'capable (not chosen)' or why it was rejected.

    When ``KVMEM_BACKEND`` forces a backend that cannot run ``call`` (the call itself would raise),
    that backend reads 'rejected (forced by KVMEM_BACKEND=<name>): <why>' and every other backend
    still says why it was or was not capable."""
    forced = _forced()
    forced_why = BY_NAME[forced].rejects(call) if forced is not None else None
    chosen = None if forced_why is not None else select(call).name
    result = {}
    for backend in BACKENDS:
        why = forced_why if backend.name == forced else backend.rejects(call)
        if backend.name == chosen:
            result[backend.name] = "selected"
        elif backend.name == forced:
            # Starts with 'rejected' like every rejection (the demo and bench skip on that).
            result[backend.name] = f"rejected (forced by KVMEM_BACKEND={forced}): {why[1]}"
        elif why is None:
            result[backend.name] = "capable (not chosen)"
        else:
            result[backend.name] = f"rejected: {why[1]}"
    return result
