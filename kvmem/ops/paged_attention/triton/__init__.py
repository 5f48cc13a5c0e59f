"""Triton paged attention: a varlen prefill kernel and a split-K decode kernel.

Both kernels work in the base-2 domain: a score ``s`` (natural-log units) is kept as
``s * log2(e)`` so that ``exp`` becomes ``exp2``; the lse is converted back to natural log on
store.  Keys are gathered per key: key ``n`` of a sequence lives in physical block
``block_table[b, n // page_size]`` at offset ``n % page_size``, so the key tile (``BLOCK_N``)
is independent of the page size (1..256).

NaN safety: the block table is loaded only for keys that may be visible, masked K/V rows are
loaded as 0 (so ``0 * v`` never meets a NaN) and masked scores are set to ``-inf`` with
``tl.where``.

Caches: any float dtype (converted on load when not q's), or float8 (e4m3fn, e5m2: passed as
uint8 and decoded in registers) with 0-d or per-KV-head ``k_scale``/``v_scale``; a float cache
may have scales too (the load transform: tiles.py).
"""

from __future__ import annotations

import torch
import triton

from kvmem.ops import _triton as _facts
from kvmem.ops.paged_attention import configs as _cfg
from kvmem.ops.paged_attention.triton.decode import _decode_kernel, _decode_reduce_kernel
from kvmem.ops.paged_attention.triton.prefill import _prefill_kernel

LOG2E = 1.4426950408889634

__all__ = ["paged_attention", "launch_prefill", "launch_decode"]


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _score_params(scale: float, softcap: float):
    if softcap is not None and softcap > 0:
        return scale * LOG2E, scale / softcap, softcap * LOG2E, True
    return scale * LOG2E, 1.0, 1.0, False


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=t.device)


def _rope_params(q, rope_cos_sin):
    """(table, its row stride, rot_dim, ROPE) for RoPE on load (a dummy table without)."""
    if rope_cos_sin is None:
        return _dummy(q), 0, 0, False
    return rope_cos_sin, rope_cos_sin.stride(0), rope_cos_sin.shape[1], True


def _kv_params(q, k_cache, v_cache, k_scale, v_scale):
    """(k storage, v storage, FORMAT, k_scale, v_scale, their strides, has_scale): the caches as
    the kernels take them (float8 as uint8) and their scales (each 0-d or [Hkv]; dummies without)."""
    fmt = _facts.cache_format(k_cache.dtype)
    has_scale = k_scale is not None
    assert has_scale == (v_scale is not None) and (has_scale or fmt == _facts.FLOAT), \
        "float8 caches need k_scale and v_scale"
    if has_scale:
        assert k_scale.dtype == v_scale.dtype == torch.float32
        strides = (1 if k_scale.dim() == 1 else 0, 1 if v_scale.dim() == 1 else 0)
    else:
        k_scale = v_scale = _dummy(q)
        strides = (0, 0)
    return _facts.storage(k_cache), _facts.storage(v_cache), fmt, k_scale, v_scale, strides, has_scale


def launch_prefill(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                   max_seqlen_q, scale, causal, window, softcap, sink_logits, cfg=None,
                   rope_cos_sin=None, rope_neox=True, k_scale=None, v_scale=None):
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    page_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qk_scale, sc_in, sc_out, use_softcap = _score_params(scale, softcap)
    fp32 = q.dtype == torch.float32
    has_sink = sink_logits is not None
    write_lse = lse is not None
    sink = sink_logits if has_sink else _dummy(q)
    lse_t = lse if write_lse else _dummy(q)
    lse_strides = (lse.stride(0), lse.stride(1)) if write_lse else (0, 0)
    rope, stride_rope, rot_dim, use_rope = _rope_params(q, rope_cos_sin)
    rope_neox = bool(rope_neox) if use_rope else True
    block_d = _cfg.block_d(head_dim)
    k_store, v_store, fmt, k_scale, v_scale, scale_strides, has_scale = _kv_params(q, k_cache, v_cache, k_scale, v_scale)

    def launch(c: _cfg.PrefillConfig):
        c = _cfg.cache_config(_cfg.rope_config(c) if use_rope else c, q.dtype, k_cache.dtype)
        num_tiles = num_tokens // c.block_m + num_seqs
        grid = (num_tiles, num_heads)
        _prefill_kernel[grid](
            q, k_store, v_store, block_table, seq_lens, cu_seqlens_q, sink, rope, k_scale, v_scale, out, lse_t,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0),
            out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
            num_seqs, num_tiles, group, page_size,
            qk_scale, sc_in, sc_out, int(window) if window and window > 0 else 0,
            1 if causal else 0, 1 if has_sink else 0, 1 if write_lse else 0, stride_rope, rot_dim,
            scale_strides[0], scale_strides[1], head_dim,
            BLOCK_D=block_d, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            SOFTCAP=use_softcap, FP32=fp32, ROPE=use_rope, ROPE_NEOX=rope_neox, SEARCH_BLOCK=_cfg.SEARCH_BLOCK,
            FORMAT=fmt, HAS_SCALE=has_scale,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    if cfg is None:
        arch = _cfg.arch_of(q.device)
        cfg = _cfg.tuned(
            "prefill",
            _cfg.prefill_key(q.dtype, head_dim, group, page_size, max_seqlen_q, arch) + (use_rope, str(k_cache.dtype),
                                                                                        has_scale),
            _cfg.prefill_configs(q.dtype, block_d, arch),
            _cfg.prefill_heuristic(q.dtype, block_d, arch, max_seqlen_q), launch, q.device)
    launch(cfg)


def launch_decode(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                  max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                  cfg=None, num_splits=None, rope_cos_sin=None, rope_neox=True, k_scale=None, v_scale=None):
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    page_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qk_scale, sc_in, sc_out, use_softcap = _score_params(scale, softcap)
    fp32 = q.dtype == torch.float32
    has_sink = sink_logits is not None
    write_lse = lse is not None
    sink = sink_logits if has_sink else _dummy(q)
    lse_t = lse if write_lse else _dummy(q)
    lse_strides = (lse.stride(0), lse.stride(1)) if write_lse else (0, 0)
    rope, stride_rope, rot_dim, use_rope = _rope_params(q, rope_cos_sin)
    rope_neox = bool(rope_neox) if use_rope else True
    block_d = _cfg.block_d(head_dim)
    rows = _cfg.decode_rows(group * max(1, max_seqlen_q), q.dtype, block_d)
    num_row_chunks = triton.cdiv(group * max(1, max_seqlen_q), rows)
    k_store, v_store, fmt, k_scale, v_scale, scale_strides, has_scale = _kv_params(q, k_cache, v_cache, k_scale, v_scale)

    def launch(c: _cfg.DecodeConfig, splits=None):
        c = _cfg.cache_config(_cfg.rope_config(c) if use_rope else c, q.dtype, k_cache.dtype)
        if splits is None:
            splits = _cfg.decode_num_splits(num_seqs, num_kv_heads * num_row_chunks,
                                            max_seqlen_k, c.block_n, q.device)
        if splits > 1:
            part_out = torch.empty((splits, num_tokens, num_heads, head_dim), dtype=torch.float32,
                                   device=q.device)
            part_lse = torch.empty((splits, num_tokens, num_heads), dtype=torch.float32,
                                   device=q.device)
        else:
            part_out = part_lse = _dummy(q)
        ps = part_out.stride() if splits > 1 else (0, 0, 0, 1)
        pls = part_lse.stride() if splits > 1 else (0, 0, 1)
        grid = (num_seqs, num_kv_heads * num_row_chunks, splits)
        _decode_kernel[grid](
            q, k_store, v_store, block_table, seq_lens, cu_seqlens_q, sink, rope, k_scale, v_scale, out, lse_t,
            part_out, part_lse,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0),
            out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
            ps[0], ps[1], ps[2], pls[0], pls[1],
            num_row_chunks, group, page_size, splits,
            qk_scale, sc_in, sc_out, int(window) if window and window > 0 else 0,
            1 if causal else 0, 1 if has_sink else 0, 1 if write_lse else 0, stride_rope, rot_dim,
            scale_strides[0], scale_strides[1], head_dim,
            BLOCK_D=block_d, ROWS=rows, BLOCK_N=c.block_n,
            SOFTCAP=use_softcap, FP32=fp32, ROPE=use_rope, ROPE_NEOX=rope_neox, FORMAT=fmt, HAS_SCALE=has_scale,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
        if splits > 1:
            block_h = _cfg.reduce_block_h(block_d)
            rgrid = (num_seqs, max(1, max_seqlen_q), triton.cdiv(num_heads, block_h))
            _decode_reduce_kernel[rgrid](
                part_out, part_lse, cu_seqlens_q, sink, out, lse_t,
                ps[0], ps[1], ps[2], pls[0], pls[1],
                out.stride(0), out.stride(1), lse_strides[0], lse_strides[1],
                num_heads, head_dim, splits, 1 if has_sink else 0, 1 if write_lse else 0,
                BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
            )

    if cfg is None:
        arch = _cfg.arch_of(q.device)
        cfg = _cfg.tuned(
            "decode",
            _cfg.decode_key(q.dtype, head_dim, group, page_size, rows, arch) + (use_rope, str(k_cache.dtype), has_scale),
            _cfg.decode_configs(q.dtype, block_d, arch, rows),
            _cfg.decode_heuristic(q.dtype, block_d, arch, rows), lambda c: launch(c, num_splits),
            q.device)
    launch(cfg, num_splits)


def paged_attention(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
                    window: int, softcap: float, sink_logits, k_scale=None, v_scale=None, rope_cos_sin=None,
                    rope_neox: bool = True) -> None:
    """Write attention of ``q`` over the paged caches into ``out`` (and ``lse`` if not None).

    ``window <= 0`` / ``softcap <= 0`` (or None) mean none. ``k_scale``/``v_scale`` (fp32, 0-d or
    [Hkv], both or neither; required by float8 caches): the caches hold ``k / k_scale``.
    ``rope_cos_sin: [num_positions, rot_dim]`` fp32 (or None): RoPE on load, key n rotated at
    position n (halves if ``rope_neox``, else interleaved pairs) in fp32, after the scale.
    Tokens not covered by ``cu_seqlens_q`` are left untouched. No host synchronisation.
    """
    assert q.dim() == 3 and k_cache.dim() == 4 and v_cache.dim() == 4
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert out.stride(-1) == 1 and block_table.stride(-1) == 1
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if _cfg.use_decode(max_seqlen_q, group):
        launch_decode(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                      max_seqlen_q, max_seqlen_k, scale, causal, window, softcap, sink_logits,
                      rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, k_scale=k_scale, v_scale=v_scale)
    else:
        launch_prefill(out, lse, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                       max_seqlen_q, scale, causal, window, softcap, sink_logits,
                       rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, k_scale=k_scale, v_scale=v_scale)


AOT_KERNELS = {"prefill": _prefill_kernel, "decode": _decode_kernel, "decode_reduce": _decode_reduce_kernel}
aot_variants = _cfg.aot_variants  # for tools/aot_compile_triton.py
