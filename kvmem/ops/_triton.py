"""Facts and helpers shared by the ops' Triton kernels (``kvmem/ops/<op>/triton.py``); importing
this module does not import triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # element types the kernels are built and tuned for
HEAD_DIMS = (64, 80, 96, 112, 128, 256)  # head dims the kernels are tuned (and compiled ahead of time) for
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def reduce_block_h(bd: int) -> int:
    """Heads per program of the small memory-bound kernels (decode reduce, merge, cache write)."""
    return max(1, 1024 // bd)


@dataclass(frozen=True)
class AotVariant:
    kernel: str  # "prefill" | "decode" | "decode_reduce" | "merge_states" | "cache_write" | "memory_select_scores"
    dtype: str  # element type of q/out (attention), of out (merge), of the cache (cache write)
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    num_stages: int
    src_dtype: Optional[str] = None  # cache write: element type of k/v
    cache_dtype: Optional[str] = None  # attention: element type of the caches, when not ``dtype``

    @property
    def name(self) -> str:
        ce = ",".join(f"{k}={v}" for k, v in self.constexprs)
        src = f"{self.src_dtype}->" if self.src_dtype else ""
        cache = f" over {self.cache_dtype}" if self.cache_dtype else ""
        return f"{self.kernel}[{src}{self.dtype}{cache}; {ce}; w{self.num_warps} s{self.num_stages}]"


def block_ds() -> list:
    return sorted({block_d(hd) for hd in HEAD_DIMS})


# Cache element formats of the kernels' FORMAT constexpr (kvmem/ops/triton_fp8.py): a float cache
# (loaded in its own dtype) or a float8 cache (uint8 storage, converted with integer bit operations).
FLOAT, E4M3, E5M2 = 0, 1, 2
FP8_FORMATS = {getattr(torch, n): f for n, f in (("float8_e4m3fn", E4M3), ("float8_e5m2", E5M2)) if hasattr(torch, n)}
FORMAT_NAMES = {E4M3: "e4m3", E5M2: "e5m2"}  # AotVariant dtype names of the float8 caches (uint8 pointers)
CACHE_DTYPES = DTYPES + tuple(FP8_FORMATS)  # cache dtypes the Triton kernels take


def cache_format(dtype) -> int:
    """FORMAT of a cache of ``dtype``."""
    return FP8_FORMATS.get(dtype, FLOAT)


def storage(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` as the kernels take it: a float8 cache viewed as uint8, a float cache as is."""
    return cache.view(torch.uint8) if cache.dtype in FP8_FORMATS else cache
