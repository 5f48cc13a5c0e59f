"""Random paged-attention test cases, built the hard way on purpose.

* block tables are shuffled permutations of a pool larger than needed;
* table entries a sequence does not need (past its length, and before its sliding window) are -1;
* every slot of the pool that holds no live token is NaN, so any read of it shows;
* K/V caches may be strided views of one interleaved pool, q a head-slice of a packed qkv tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from kvmem.ops import reference


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.cu_seqlens_q,
                self.max_seqlen_q, self.max_seqlen_k)

    def reference(self):
        return reference.paged_attention(*self.args(), **self.kwargs)

    def describe(self) -> str:
        return (f"q_lens={(self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).tolist()} "
                f"seq_lens={self.seq_lens.tolist()} Hq={self.q.shape[1]} Hkv={self.k_cache.shape[2]} "
                f"D={self.q.shape[2]} bs={self.k_cache.shape[1]} dtype={self.q.dtype} {self.kwargs}")


def make_case(
    q_lens: List[int],
    kv_lens: List[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    causal: bool = True,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sink: bool = False,
    strided: bool = False,
    spare_blocks: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> Case:
    """Build a case; ``kv_lens[b] >= q_lens[b]`` (kv length after the step's write)."""
    assert len(q_lens) == len(kv_lens) and all(k >= q for q, k in zip(q_lens, kv_lens))
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(k / block_size) for k in kv_lens]
    num_blocks = sum(need) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if strided:  # K and V interleaved in one pool: non-contiguous views
        pool = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), math.nan, dtype=dtype)
        k_cache, v_cache = pool[:, 0], pool[:, 1]
    else:
        k_cache = torch.full(shape, math.nan, dtype=dtype)
        v_cache = torch.full(shape, math.nan, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need + [1]) + 1
    table = torch.full((len(kv_lens), width), -1, dtype=torch.int32)
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        blocks = [perm.pop() for _ in range(need[b])]
        lo, _ = reference.visible_key_range(kv_len, q_len, causal, window)
        first_needed = lo // block_size
        for i, blk in enumerate(blocks):
            if i < first_needed:
                continue  # left the window: freed, entry -1, its slots stay NaN
            table[b, i] = blk
            n = min(block_size, kv_len - i * block_size)
            k_cache[blk, :n] = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[blk, :n] = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
    num_tokens = sum(q_lens)
    if strided:  # q as a head-slice of a packed [T, Hq + 2*Hkv, D] projection
        qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
        q = qkv[:, :num_heads]
    else:
        q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    kwargs = dict(scale=1.0 / math.sqrt(head_dim), causal=causal)
    if window is not None:
        kwargs["window"] = window
    if softcap is not None:
        kwargs["softcap"] = softcap
    if sink:
        kwargs["sink_logits"] = torch.randn(num_heads, generator=g)
    case = Case(q, k_cache, v_cache, table, torch.tensor(kv_lens, dtype=torch.int32), cu,
                max(q_lens + [0]), max(kv_lens + [0]), kwargs)
    if device != "cpu":
        case = to_device(case, device)
    return case


def to_device_keep_layout(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` with the same sizes, strides and storage offset (``t.to(device)``
    would make a strided view contiguous): its whole storage is copied and viewed the same way."""
    if t.is_contiguous() and t.storage_offset() == 0:
        return t.to(device)
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = t.as_strided((n,), (1,), 0).to(device)
    return flat.as_strided(t.size(), t.stride(), t.storage_offset())


def to_device(case: Case, device) -> Case:
    """The case on ``device``; strided views (interleaved K/V pools, q sliced from qkv) stay strided."""
    mv = lambda t: to_device_keep_layout(t, device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return Case(*(mv(a) for a in case.args()), {k: mv(v) for k, v in case.kwargs.items()})


# Batches by mode: (q_lens, kv_lens).
MODES = {
    "prefill": ([5, 1, 17], [5, 1, 17]),
    "prefill_cached_prefix": ([7, 3, 20], [19, 40, 33]),
    "decode": ([1, 1, 1, 1], [1, 9, 33, 70]),
    "mixed": ([1, 6, 1, 0, 13], [40, 6, 17, 5, 29]),
}
# Feature sets (each applied to every mode).
FEATURES = {
    "plain": {},
    "window": dict(window=7),
    "softcap": dict(softcap=5.0),
    "sink": dict(sink=True),
    "all": dict(window=11, softcap=3.0, sink=True),
}
