"""The specification of kvmem's ops, in plain PyTorch with fp32 math.

Every backend (CUDA, Triton, C++ CPU) is tested against these functions. They do no argument
checking (the public ops in ``kvmem.ops`` do that) and favour clarity over speed, with one
exception: they read only the pages a sequence needs, so block-table entries that lie beyond a
sequence's needed blocks (or before its sliding window) may hold anything, -1 included.

Semantics (frozen by "Paged KV core 1/3"):

* A *slot* is ``block * block_size + offset``. ``slot_mapping[t] == -1`` means token ``t`` is
  padding and is not written.
* ``seq_lens[b]`` is the KV length of sequence ``b`` *after* this step's cache write. Its
  ``q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` queries are the last ones: query ``i`` sits at
  position ``p = seq_lens[b] - q_len_b + i`` (bottom-right aligned causal mask).
* Key ``j`` is visible to the query at ``p`` iff ``j < seq_lens[b]``, and ``j <= p`` when causal,
  and ``j > p - window`` when a window is given (Hugging Face's sliding-window rule).
* Score: ``s = scale * q.k``; with ``softcap=c``: ``s = c * tanh(s / c)`` (before masking).
* ``sink_logits[h]`` is an extra, unscaled logit in the softmax denominator of head ``h`` that
  attends to no value (gpt-oss): ``p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h))``.
* ``lse = log(sum_j exp(s_j) [+ exp(sink_h)])`` in natural log, fp32; ``-inf`` when nothing is
  visible (then ``out`` is 0).
* Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (grouped-query attention).
* ``k_scale``/``v_scale`` (fp8 and other quantised caches): the stored key/value is multiplied by
  the scale on load; a 0-d tensor (per tensor) or ``[Hkv]`` (per KV head), fp32. ``cache_write``
  given the same scales stores ``k / k_scale`` (then casts to the cache's dtype).
* ``rope_cos_sin`` (RoPE on load: keys cached *before* rotary embedding): ``[num_positions,
  rot_dim]`` fp32, row ``p`` = ``cos(p*theta_i)`` for ``i < rot_dim/2`` then ``sin(p*theta_i)``.
  Key ``j`` of a sequence is rotated at position ``j`` when loaded (after ``k_scale``), in its first
  ``rot_dim`` channels (partial rotary leaves the rest): ``rope_neox=True`` rotates the two halves
  ``(x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)`` (Llama/NeoX, HF's ``rotate_half``), ``False``
  rotates interleaved pairs ``(x[2i], x[2i+1])`` (GPT-J). Queries arrive already rotated.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["cache_write", "paged_attention", "merge_states", "visible_key_range", "apply_rotary"]


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Scatter new tokens into the paged caches, in place.

    Parameters
    ----------
    k, v: [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: [num_tokens] int64, ``block * block_size + offset``; -1 skips the token.
    k_scale, v_scale: fp32 0-d or [num_kv_heads] quantisation scales: ``k / k_scale`` is stored
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    kk, vv = k[keep], v[keep]
    if k_scale is not None:
        kk = kk.float() / _scale_of(k_scale).reshape(-1, 1)
        vv = vv.float() / _scale_of(v_scale).reshape(-1, 1)
    k_cache[blocks, offsets] = kk.to(k_cache.dtype)
    v_cache[blocks, offsets] = vv.to(v_cache.dtype)


def visible_key_range(kv_len: int, q_len: int, causal: bool, window: Optional[int]) -> Tuple[int, int]:
    """Half-open range ``[lo, hi)`` of the keys that any query of a sequence may see."""
    if q_len == 0:
        return 0, 0
    first_pos = kv_len - q_len
    lo = max(0, first_pos - window + 1) if window is not None else 0
    return lo, kv_len


def _scale_of(scale: Optional[torch.Tensor], dtype=torch.float32) -> Optional[torch.Tensor]:
    if scale is None:
        return None
    scale = scale.to(dtype)
    return scale.reshape(1, -1, 1) if scale.dim() == 1 else scale  # [1, Hkv, 1] or []


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


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    ``lse = log(exp(lse_a) + exp(lse_b))``,
    ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``; a partial whose lse is
    ``-inf`` (it saw no key) contributes nothing, and two empty partials give ``out = 0``,
    ``lse = -inf``.

    Parameters
    ----------
    out_a, out_b: [num_tokens, num_heads, head_dim]
    lse_a, lse_b: [num_tokens, num_heads] fp32

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in out_a's dtype; lse: [num_tokens, num_heads] fp32
    """
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(la - safe), torch.zeros_like(lse))[..., None]
    wb = torch.where(finite, torch.exp(lb - safe), torch.zeros_like(lse))[..., None]
    oa = torch.where(wa > 0, out_a.float(), torch.zeros((), device=out_a.device))
    ob = torch.where(wb > 0, out_b.float(), torch.zeros((), device=out_b.device))
    out = oa * wa + ob * wb
    return out.to(out_a.dtype), lse
