"""``kvmem::paged_attention``: varlen prefill, chunked prefill and decode over paged K/V.

The op folder: ``params`` (the one parameter object), ``validate``, ``reference``,
``capabilities`` (what each backend runs), ``triton`` + ``configs`` (the Triton kernels).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem import dispatch
from kvmem.ops._common import check_all
from kvmem.ops.paged_attention import capabilities, validate  # noqa: F401  (capabilities registers)
from kvmem.ops.paged_attention.params import OP, PagedAttentionParams, default_scale

__all__ = ["paged_attention", "PagedAttentionParams"]


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
    params = PagedAttentionParams.from_schema(
        out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, scale,
        causal, window, softcap, sink_logits, k_scale, v_scale, rope_cos_sin, rope_neox)
    dispatch.select(params.call()).run(OP, params)


@_paged_attention_op.register_fake
def _(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
      max_seqlen_k, scale, causal, window, softcap, sink_logits, k_scale, v_scale, rope_cos_sin=None,
      rope_neox=True):
    torch._check(q.dim() == 3 and k_cache.dim() == 4 and out.dim() == 3, lambda: "paged_attention: q/out 3-D, k_cache 4-D")
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    checks = [(out.shape[i], q.shape[i], f"out.shape[{i}] vs q.shape[{i}]") for i in range(3)]
    checks += [(v_cache.shape[i], k_cache.shape[i], f"v_cache.shape[{i}] vs k_cache.shape[{i}]") for i in range(4)]
    checks += [(k_cache.shape[3], q.shape[2], "k_cache head_dim vs q head_dim"),
               (num_heads % num_kv_heads, 0, "num_heads % num_kv_heads"),
               (block_table.shape[0], seq_lens.shape[0], "block_table rows vs seq_lens"),
               (cu_seqlens_q.shape[0], seq_lens.shape[0] + 1, "cu_seqlens_q vs seq_lens + 1")]
    if lse is not None:
        checks += [(lse.shape[i], q.shape[i], f"lse.shape[{i}] vs q.shape[{i}]") for i in range(2)]
    if sink_logits is not None:
        checks.append((sink_logits.shape[0], num_heads, "sink_logits vs num_heads"))
    check_all(checks)
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
    """Attention of varlen queries over a paged KV cache (semantics: ``kvmem.ops.spec``).

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
        sin half; rot_dim even, <= head_dim), in fp32 whatever the cache dtype; q is not rotated.
        Implemented by the cpu, triton and cuda backends.
    rope_neox: RoPE style: rotate halves (Llama/NeoX, True) or interleaved pairs (GPT-J, False)
    out: [num_tokens, num_heads, head_dim] in q's dtype, written in place when given
    return_lse: also return ``lse: [num_tokens, num_heads]`` fp32 (natural log)
    check: validate values too (one device->host sync); kvmem's planned hot path passes False

    Returns
    -------
    out, or ``(out, lse)`` when ``return_lse``.
    """
    scale = default_scale(q, scale)
    validate.structure(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                       scale, causal, window, softcap, sink_logits, k_scale, v_scale, out, return_lse,
                       rope_cos_sin, rope_neox)
    if check:
        validate.values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, window)
    params = PagedAttentionParams.build(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, window=window, softcap=softcap, sink_logits=sink_logits, k_scale=k_scale, v_scale=v_scale,
        rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, out=out, return_lse=return_lse)
    torch.ops.kvmem.paged_attention(*params.to_schema())
    return (params.out, params.lse) if return_lse else params.out
