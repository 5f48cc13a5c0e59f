"""The backends: where an op's kernels come from, and when they are available.

A backend holds no per-op code: what it runs of each op (and how) is the op folder's
:class:`~kvmem.dispatch.capability.Capability` record. A backend adds only what is true of all
its ops: the device its tensors live on, whether its kernels are importable or built, and (CUDA)
the verified record.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, List, Optional

import torch

from kvmem import _ext, verified
from kvmem.dispatch.capability import Capability, Rejection, capability


class Backend:
    """One source of kernels. ``rejects(call)`` says why it cannot run a call (or None);
    ``run(op, params)`` runs the op's registered implementation."""

    name = "?"

    def capability(self, op: str) -> Optional[Capability]:
        return capability(op, self.name)

    def unavailable(self, call) -> Rejection:
        """Backend-wide reasons (device, not built, not importable); None when available."""
        return None

    def rejects(self, call) -> Rejection:
        cap = self.capability(call.op)
        if cap is None:
            return ("inapplicable", f"{self.name} has no {call.op} kernel")
        if call.device_type not in cap.devices:
            return ("inapplicable", f"runs on {' or '.join(cap.devices)} tensors, not {call.device_type}")
        return self.unavailable(call) or cap.rejects(call)

    def run(self, op: str, params) -> None:
        """Run ``op`` on ``params`` (already validated; a call this backend does not reject)."""
        capability(op, self.name).run(params)


class ReferenceBackend(Backend):
    """The pure-PyTorch specification: runs everything, anywhere, slowly."""

    name = "reference"


class CompiledBackend(Backend):
    """Ops from the compiled extension ``torch.ops.kvmem_C`` for one device type; dtypes and head
    dims are the build's (``kvmem._ext.build_info()["kernels"]``)."""

    device_type = "?"

    def capability(self, op: str) -> Optional[Capability]:
        """The op's record, with the dtypes and head dims this build compiled (``from_build``)."""
        cap = capability(op, self.name)
        if cap is None or not cap.from_build:
            return cap
        facts = _ext.kernel_facts(cap.kernel_op, self.device_type)
        if facts is None:
            return cap
        cache_dtypes = facts.get("cache_dtypes")
        return _with_facts(cap, tuple(facts["dtypes"]), tuple(facts["head_dims"]), int(facts["max_head_dim"]),
                           None if cache_dtypes is None else tuple(cache_dtypes))

    def unavailable(self, call) -> Rejection:
        op = capability(call.op, self.name).kernel_op  # a composite op needs the kernels it is built from
        if not _ext.has_kernel(op, self.device_type):
            err = _ext.load_error() or f"kvmem_C::{op} has no {self.device_type} kernel in this build"
            return ("inapplicable", f"{err}; {_ext.BUILD_HINT}")
        if _ext.kernel_facts(op, self.device_type) is None:
            return ("fallback", f"this build does not report what kvmem_C::{op} takes on {self.device_type} "
                                f"(an older build?); {_ext.BUILD_HINT}")
        return None


@functools.lru_cache(maxsize=None)
def _with_facts(cap: Capability, dtypes: tuple, head_dims: tuple, max_head_dim: int,
                cache_dtypes: Optional[tuple] = None) -> Capability:
    """``cap`` with the build's facts; ``cache_dtypes`` (ops with a KV cache, when the build reports
    them): the cache dtypes the kernel takes with any of its dtypes (else the record's own rule)."""
    extra = {} if cache_dtypes is None else {"cache_dtypes": tuple(getattr(torch, n) for n in cache_dtypes)}
    return dataclasses.replace(cap, dtypes=tuple(getattr(torch, n) for n in dtypes), head_dims=head_dims,
                               max_head_dim=max_head_dim, **extra)


class CpuBackend(CompiledBackend):
    """C++ kernels (OpenMP), csrc/cpu."""

    name = "cpu"
    device_type = "cpu"


def cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


class CudaBackend(CompiledBackend):
    """Hand-written CUDA kernels, csrc/cuda. Chosen by default only for configurations that the
    committed verified record (kvmem/verified/cuda.json, written by benchmarks/gpu_check.sh) lists
    as passing on this GPU architecture; ``KVMEM_BACKEND=cuda`` forces it."""

    name = "cuda"
    device_type = "cuda"

    def rejects(self, call) -> Rejection:
        why = super().rejects(call)
        if why is not None:
            return why
        if forced() != "cuda":
            arch = cuda_arch()
            if not verified.is_verified("cuda", arch, call):
                return ("inapplicable", f"not in the verified record for {arch} "
                                        "(run benchmarks/gpu_check.sh; KVMEM_BACKEND=cuda forces it)")
        return None


class TritonBackend(Backend):
    """Triton kernels (each op folder's ``triton.py``, imported lazily). On CPU tensors only when
    forced together with ``TRITON_INTERPRET=1`` (the interpreter is for testing, not speed)."""

    name = "triton"

    @functools.cached_property
    def _import_error(self) -> Optional[Exception]:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return e
        return None

    def rejects(self, call) -> Rejection:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if call.device_type == "cpu" and interpret and forced() == "triton":
            cap = self.capability(call.op)
            if cap is not None:
                cap = dataclasses.replace(cap, devices=cap.devices + ("cpu",))
        else:
            cap = self.capability(call.op)
        if cap is not None and call.device_type not in cap.devices:
            return ("inapplicable", f"runs on {' or '.join(cap.devices)} tensors, not {call.device_type} "
                                    "(on CPU only with TRITON_INTERPRET=1 and KVMEM_BACKEND=triton)")
        if self._import_error is not None:
            return ("inapplicable", f"triton kernels not importable ({self._import_error}); pip install triton")
        if cap is None:
            return ("inapplicable", f"{self.name} has no {call.op} kernel")
        return cap.rejects(call)


BACKENDS: List[Backend] = [CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend()]  # fastest first
BY_NAME: Dict[str, Backend] = {b.name: b for b in BACKENDS}


def forced() -> Optional[str]:
    """The backend ``KVMEM_BACKEND`` names (None for unset/auto); ValueError for an unknown name."""
    name = os.environ.get("KVMEM_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BY_NAME:
        raise ValueError(f"KVMEM_BACKEND must be one of auto, {', '.join(BY_NAME)}; got {name!r}")
    return name
