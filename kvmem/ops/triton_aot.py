"""Every op's Triton kernels, for ahead-of-time compilation (``tools/aot_compile_triton.py``) and
the GPU tests: each registered op folder's ``triton`` module gives ``aot_variants(arch)`` and
``AOT_KERNELS``. Imports triton; nothing in kvmem imports this module.
"""

from __future__ import annotations

import importlib
from typing import Dict, Iterator

from kvmem.ops import OP_NAMES
from kvmem.ops._triton import DTYPE_NAMES, FORMAT_NAMES, AotVariant, interpreting  # noqa: F401  (for the GPU tests)


def triton_modules() -> Dict[str, object]:
    """``{op: kvmem.ops.<op>.triton}`` for every registered op that has Triton kernels (imports triton)."""
    mods = {}
    for op in OP_NAMES:
        try:
            mods[op] = importlib.import_module(f"kvmem.ops.{op}.triton")
        except ModuleNotFoundError as e:
            if e.name != f"kvmem.ops.{op}.triton":
                raise
    return mods


def aot_variants(arch: int = 80) -> Iterator[AotVariant]:
    """Every Triton kernel variant of every op (each op's ``triton.aot_variants``)."""
    for mod in triton_modules().values():
        yield from mod.aot_variants(arch)


def aot_kernels() -> Dict[str, object]:
    """``{AotVariant.kernel: jit function}`` of every op's Triton kernels."""
    out = {}
    for mod in triton_modules().values():
        out.update(mod.AOT_KERNELS)
    return out
