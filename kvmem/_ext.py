"""Late, optional loading of the compiled extension ``kvmem._C``.

``import kvmem`` never needs a compiler. The compiled ops live in ``torch.ops.kvmem_C`` once
``kvmem._C`` is imported; when it is missing, :func:`get_op` raises an error that says how to
build it, and the dispatcher picks another backend meanwhile (one warning on the ``kvmem`` logger
says so, the first time the extension is looked for).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

BUILD_HINT = (
    "build it from the repository root with "
    "`pip install --no-build-isolation -e .` (needs gcc; CUDA ops also need nvcc), "
    "or run `bash run.sh test` which sets everything up"
)


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Import the extension once; return None on success, else why it failed."""
    try:
        from kvmem import _C  # noqa: F401  (registers torch.ops.kvmem_C.*)
    except ImportError as e:  # not built, or built against another torch
        err = f"kvmem._C is not importable ({e})"
        logging.getLogger("kvmem").warning(
            "kvmem: compiled kernels unavailable (%s): the ops fall back to the Triton (CUDA tensors) "
            "or reference backends; %s", err, BUILD_HINT)
        return err
    return None


def load_error() -> Optional[str]:
    return _load()


def has_op(name: str) -> bool:
    """Whether the compiled op ``kvmem_C::name`` exists (for any device)."""
    if _load() is not None:
        return False
    return hasattr(torch.ops.kvmem_C, name)


def has_kernel(name: str, device_type: str) -> bool:
    """Whether ``kvmem_C::name`` has a kernel registered for ``device_type`` ('cpu', 'cuda')."""
    if not has_op(name):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kvmem_C::{name}", key)


def get_op(name: str):
    """The compiled op ``torch.ops.kvmem_C.<name>``, or a RuntimeError saying how to build it."""
    err = _load()
    if err is not None:
        raise RuntimeError(f"kvmem compiled op '{name}' is unavailable: {err}; {BUILD_HINT}")
    if not hasattr(torch.ops.kvmem_C, name):
        raise RuntimeError(f"kvmem compiled op '{name}' is missing from this build; rebuild: {BUILD_HINT}")
    return getattr(torch.ops.kvmem_C, name)


def build_info() -> dict:
    """Facts the extension reports about its build (compiled archs, versions), or why it is absent."""
    err = _load()
    if err is not None:
        return {"built": False, "error": err}
    from kvmem import _C

    return {"built": True, **_C.build_info()}


@functools.lru_cache(maxsize=None)
def kernel_facts(op: str, device_type: str) -> Optional[dict]:
    """What the compiled ``kvmem_C::op`` kernel for ``device_type`` accepts, as the build reports
    it: ``{"dtypes": [names], "head_dims": [ints] (empty: any up to max_head_dim),
    "max_head_dim": int}``; None when the build reports nothing for it."""
    return build_info().get("kernels", {}).get(op, {}).get(device_type)
