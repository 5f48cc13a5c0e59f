"""``kvmem::paged_attention``: varlen prefill, chunked prefill and decode over paged K/V."""

from __future__ import annotations

import math
from typing import Optional

import torch

from kvmem import backends
from kvmem.ops import _validate


@torch.library.custom_op("kvmem::paged_attention", mutates_args=("out", "lse"))
def _paged_attention_op(
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    sink_logits: Optional[torch.Tensor],
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    rope_cos_sin: Optional[torch.Tensor] = None,
    rope_neox: bool = True,
) -> None:
    """Op schema (window <= 0 and softcap <= 0 mean none). Writes out (and lse when given)."""
    call = backends.Call.paged_attention(q, k_cache, v_cache, max_seqlen_q, window if window > 0 else None,
                                         softcap if softcap > 0 else None, sink_logits, k_scale, rope_cos_sin)
    backends.select(call).paged_attention(
        out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
        max_seqlen_k, scale, causal, window, softcap, sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox)


@_paged_attention_op.register_fake
def _(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
      max_seqlen_k, scale, causal, window, softcap, sink_logits, k_scale, v_scale, rope_cos_sin=None,
      rope_neox=True):
    return None


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
    scale: Optional[float] = None,
    causal: bool = True,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sink_logits: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    rope_cos_sin: Optional[torch.Tensor] = None,
    rope_neox: bool = True,
    out: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    check: bool = True,
):
    """Attention of varlen queries over a paged KV cache (semantics: ``kvmem.ops.reference``).

    Parameters
    ----------
    q: [num_tokens, num_heads, head_dim], fp16/bf16/fp32, unit last stride (other strides free)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype (stride-generic);
        with ``k_scale``/``v_scale`` any float or fp8 (float8_e4m3fn / float8_e5m2) dtype
    block_table: [batch, max_blocks] int32; entries a sequence does not need are never read
    seq_lens: [batch] int32, KV length after this step's cache_write
    cu_seqlens_q: [batch + 1] int32, query segment offsets into q
    max_seqlen_q, max_seqlen_k: host ints, at least the longest query segment / sequence
    scale: softmax scale, default ``1/sqrt(head_dim)``
    causal: bottom-right aligned causal mask (query i of b at ``seq_lens[b] - q_len_b + i``)
    window: sliding window; key j visible to position p iff ``j > p - window``
    softcap: score ``softcap * tanh(score / softcap)`` before masking
    sink_logits: [num_heads] fp32, an extra unscaled logit in each softmax denominator
    k_scale, v_scale: fp32 0-d or [num_kv_heads] dequantisation scales (fp8 / quantised caches;
        today only the reference backend implements them: other backends fall back)
    rope_cos_sin: [num_positions >= max_seqlen_k, rot_dim] fp32, RoPE on load: keys are cached
        before rotary embedding and key j is rotated at position j as it is loaded (cos half, then
        sin half; rot_dim even, <= head_dim). Today reference-only (others fall back).
    rope_neox: RoPE style: rotate halves (Llama/NeoX, True) or interleaved pairs (GPT-J, False)
    out: [num_tokens, num_heads, head_dim] in q's dtype, written in place when given
    return_lse: also return ``lse: [num_tokens, num_heads]`` fp32 (natural log)
    check: validate values too (one device->host sync); kvmem's planned hot path passes False

    Returns
    -------
    out, or ``(out, lse)`` when ``return_lse``.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 3:
        scale = 1.0 / math.sqrt(q.shape[-1])
    _validate.paged_attention_structure(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
        scale, causal, window, softcap, sink_logits, k_scale, v_scale, out, return_lse,
        rope_cos_sin, rope_neox)
    if check:
        _validate.paged_attention_values(q, k_cache, block_table, seq_lens, cu_seqlens_q,
                                         max_seqlen_q, max_seqlen_k, causal, window)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    torch.ops.kvmem.paged_attention(
        out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
        max_seqlen_k, float(scale), causal, window or 0, float(softcap or 0.0), sink_logits,
        k_scale, v_scale, rope_cos_sin, rope_neox)
    return (out, lse) if return_lse else out
