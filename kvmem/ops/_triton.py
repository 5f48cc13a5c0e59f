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

    @property
    def name(self) -> str:
        ce = ",".join(f"{k}={v}" for k, v in self.constexprs)
        src = f"{self.src_dtype}->" if self.src_dtype else ""
        return f"{self.kernel}[{src}{self.dtype}; {ce}; w{self.num_warps} s{self.num_stages}]"


def block_ds() -> list:
    return sorted({block_d(hd) for hd in HEAD_DIMS})
