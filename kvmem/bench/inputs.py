"""Benchmark inputs: a paged batch with a shuffled block table, and the same data as contiguous
tensors for dense peers (torch SDPA and friends)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor            # [B * q_len, Hq, D]
    k_cache: torch.Tensor      # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, blocks_per_seq] int32 (shuffled)
    seq_lens: torch.Tensor     # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    batch: int
    q_len: int
    ctx: int

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens,
                self.cu_seqlens_q, self.max_seqlen_q, self.max_seqlen_k)

    def kv_bytes(self) -> int:
        """K and V bytes an attention over every sequence must read."""
        hkv, d = self.k_cache.shape[2:]
        return 2 * self.batch * self.ctx * hkv * d * self.k_cache.element_size()

    def dense(self):
        """q [B, Hq, q_len, D], k/v [B, Hkv, ctx, D]: contiguous copies of the same data."""
        hkv, d = self.k_cache.shape[2:]
        n = self.block_table.shape[1]
        k = self.k_cache[self.block_table.long()].reshape(self.batch, n * self.k_cache.shape[1], hkv, d)
        v = self.v_cache[self.block_table.long()].reshape(self.batch, n * self.k_cache.shape[1], hkv, d)
        q = self.q.view(self.batch, self.q_len, -1, d).transpose(1, 2).contiguous()
        return q, k[:, : self.ctx].transpose(1, 2).contiguous(), v[:, : self.ctx].transpose(1, 2).contiguous()

    def flops(self, causal: bool = True) -> float:
        """Attention FLOPs (2 matmuls, 2 flops per MAC), counting only visible pairs."""
        hq, d = self.q.shape[1:]
        pairs = self.q_len * self.ctx - (self.q_len * (self.q_len - 1) / 2 if causal else 0)
        return 4.0 * self.batch * hq * d * pairs

    def dense_mask(self, causal: bool = True):
        """How a dense peer expresses kvmem's bottom-right causal mask on :meth:`dense` tensors.

        Returns
        -------
        (is_causal, mask)
            ``(False, None)`` when every query sees every key (not causal, or one query per
            sequence), ``(True, None)`` when ``q_len == ctx`` (top-left and bottom-right
            alignment coincide), else ``(False, mask)`` with a boolean ``[q_len, ctx]`` mask,
            True where a key is visible.
        """
        if not causal or self.q_len == 1:
            return False, None
        if self.q_len == self.ctx:
            return True, None
        mask = torch.ones(self.q_len, self.ctx, dtype=torch.bool, device=self.q.device)
        return False, mask.tril(self.ctx - self.q_len)

    def tokens(self, out_bhsd: torch.Tensor) -> torch.Tensor:
        """A dense output ``[B, Hq, q_len, D]`` in kvmem's token layout ``[B * q_len, Hq, D]``."""
        return out_bhsd.transpose(1, 2).reshape(self.q.shape)


def paged_batch(batch: int, ctx: int, q_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int = 16, dtype=torch.float32, device="cpu", seed: int = 0) -> PagedBatch:
    """Every sequence has ``ctx`` keys (after the write) and ``q_len`` queries; pages shuffled."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    table = torch.randperm(num_blocks, generator=g).view(batch, per_seq).to(torch.int32)
    q = torch.randn(batch * q_len, num_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    cu = torch.arange(0, batch + 1, dtype=torch.int32) * q_len
    return PagedBatch(q, k_cache, v_cache, table.to(device), torch.full((batch,), ctx, dtype=torch.int32, device=device),
                      cu.to(device), q_len, ctx, batch, q_len, ctx)
