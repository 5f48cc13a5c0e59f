"""Reference ``paged_attention`` (semantics: ``kvmem.ops.spec``).

Reads only the pages a sequence needs, so block-table entries beyond a sequence's needed blocks
(or before its sliding window) may hold anything, -1 included."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from kvmem.ops._common import scale_of as _scale_of

__all__ = ["paged_attention", "visible_key_range", "apply_rotary"]


def visible_key_range(kv_len: int, q_len: int, causal: bool, window: Optional[int]) -> Tuple[int, int]:
    """Half-open range ``[lo, hi)`` of the keys that any query of a sequence may see."""
    if q_len == 0:
        return 0, 0
    first_pos = kv_len - q_len
    lo = max(0, first_pos - window + 1) if window is not None else 0
    return lo, kv_len


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, neox: bool = True) -> torch.Tensor:
    """Rotary embedding of ``x: [n, heads, head_dim]`` (fp32) at ``positions: [n]``.

    ``cos_sin: [num_positions, rot_dim]`` (cos half, then sin half); channels past ``rot_dim``
    pass through.
    """
    rot = cos_sin.shape[1]
    cos, sin = cos_sin[positions].float().chunk(2, dim=-1)  # [n, rot/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    xr, rest = x[..., :rot], x[..., rot:]
    if neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    causal: bool = True,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sink_logits: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    rope_cos_sin: Optional[torch.Tensor] = None,
    rope_neox: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of varlen queries over paged keys/values (prefill, chunked prefill and decode).

    Parameters
    ----------
    q: [num_tokens, num_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: [batch, max_blocks] int32
    seq_lens: [batch] int32, KV length after this step's write
    cu_seqlens_q: [batch + 1] int32
    max_seqlen_q, max_seqlen_k: host ints, upper bounds (unused by the reference)
    sink_logits: [num_heads] fp32 or None
    k_scale, v_scale: fp32 0-d or [num_kv_heads] dequantisation scales, or None
    rope_cos_sin: [num_positions >= max key position + 1, rot_dim] fp32 (RoPE on load), or None
    rope_neox: rotate halves (True) or interleaved pairs (False)

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in q's dtype
    lse: [num_tokens, num_heads] fp32
    """
    del max_seqlen_q, max_seqlen_k
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((num_tokens, num_heads), -math.inf, dtype=torch.float32, device=q.device)
    ks, vs = _scale_of(k_scale), _scale_of(v_scale)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    table = block_table.long()
    for b, kv_len in enumerate(lens):
        q_start, q_len = cu[b], cu[b + 1] - cu[b]
        lo, hi = visible_key_range(kv_len, q_len, causal, window)
        if q_len == 0 or hi <= lo:
            continue
        first_blk, last_blk = lo // block_size, (hi - 1) // block_size
        pages = table[b, first_blk : last_blk + 1]
        k = k_cache[pages].float().flatten(0, 1)  # [n, Hkv, D], keys first_blk*bs ...
        v = v_cache[pages].float().flatten(0, 1)
        if ks is not None:
            k = k * ks
        if vs is not None:
            v = v * vs
        key_pos = torch.arange(first_blk * block_size, first_blk * block_size + k.shape[0], device=q.device)
        keep = (key_pos >= lo) & (key_pos < hi)
        k, v, key_pos = k[keep], v[keep], key_pos[keep]
        if rope_cos_sin is not None:
            k = apply_rotary(k, rope_cos_sin, key_pos, rope_neox)
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[q_start : q_start + q_len].float()  # [q_len, Hq, D]
        s = torch.einsum("qhd,khd->hqk", qb, k) * scale  # [Hq, q_len, n]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        visible = torch.ones(q_len, key_pos.shape[0], dtype=torch.bool, device=q.device)
        if causal:
            visible &= key_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= key_pos[None, :] > q_pos[:, None] - window
        s = s.masked_fill(~visible, -math.inf)
        if sink_logits is not None:
            sink = sink_logits.float().view(num_heads, 1, 1).expand(num_heads, q_len, 1)
            s = torch.cat([s, sink], dim=-1)
        seg_lse = torch.logsumexp(s, dim=-1)  # [Hq, q_len]
        p = torch.exp(s - seg_lse[..., None]).nan_to_num(0.0)
        if sink_logits is not None:
            p = p[..., :-1]
        out[q_start : q_start + q_len] = torch.einsum("hqk,khd->qhd", p, v)
        lse[q_start : q_start + q_len] = seg_lse.transpose(0, 1)
    return out.to(q.dtype), lse
