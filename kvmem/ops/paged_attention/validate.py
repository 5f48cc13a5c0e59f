"""Argument checks of ``paged_attention`` (structure always, values with ``check=True``; see
``kvmem/ops/_validate.py``)."""

from __future__ import annotations

import math

import torch

from kvmem.ops._validate import FLOAT_DTYPES, QUANT_CACHE_DTYPES, fail, host_int, kv_scales, shape, tensor, unit_last_stride


def structure(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
    scale, causal, window, softcap, sink_logits, k_scale, v_scale, out, return_lse,
    rope_cos_sin=None, rope_neox=True,
):
    op = "paged_attention"
    tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    dev = q.device
    unit_last_stride(op, "q", q)
    # float8 caches need scales; a float cache may differ from q's dtype (converted on load)
    cache_dtypes = QUANT_CACHE_DTYPES if k_scale is not None else FLOAT_DTYPES
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        tensor(op, name, c, ndim=4, dtypes=cache_dtypes if name == "k_cache" else (k_cache.dtype,), device=dev)
        unit_last_stride(op, name, c)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        fail(op, "v_cache", f"of k_cache's shape {tuple(k_cache.shape)}", f"shape {tuple(v_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        fail(op, "q", f"of head_dim {cache_head_dim} (the cache's)", f"head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        fail(op, "q", f"a number of heads divisible by the cache's num_kv_heads={num_kv_heads}",
              f"{num_heads} heads")
    if block_size < 1:
        fail(op, "k_cache", "a cache with block_size >= 1", f"shape {tuple(k_cache.shape)}")
    tensor(op, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
    tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    batch = seq_lens.shape[0]
    if block_table.shape[0] != batch:
        fail(op, "block_table", f"of {batch} rows (one per sequence in seq_lens)", f"shape {tuple(block_table.shape)}")
    tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=dev)
    shape(op, "cu_seqlens_q", cu_seqlens_q, (batch + 1,))
    host_int(op, "max_seqlen_q", max_seqlen_q)
    host_int(op, "max_seqlen_k", max_seqlen_k)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        fail(op, "scale", "a finite float > 0", scale)
    if not isinstance(causal, bool):
        fail(op, "causal", "a bool", type(causal).__name__, TypeError)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            fail(op, "window", "None or an int", type(window).__name__, TypeError)
        if window < 1:
            fail(op, "window", "None or a positive number of keys", window)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
            fail(op, "softcap", "None or a finite float > 0", softcap)
    if sink_logits is not None:
        tensor(op, "sink_logits", sink_logits, ndim=1, dtypes=(torch.float32,), device=dev)
        shape(op, "sink_logits", sink_logits, (num_heads,))
    kv_scales(op, k_scale, v_scale, num_kv_heads, dev)
    if rope_cos_sin is not None:
        tensor(op, "rope_cos_sin", rope_cos_sin, ndim=2, dtypes=(torch.float32,), device=dev)
        rot = rope_cos_sin.shape[1]
        if rot < 2 or rot % 2 or rot > head_dim:
            fail(op, "rope_cos_sin", f"[num_positions, rot_dim] with rot_dim even and in [2, head_dim={head_dim}]",
                  f"shape {tuple(rope_cos_sin.shape)}")
        if isinstance(max_seqlen_k, int) and rope_cos_sin.shape[0] < max_seqlen_k:
            fail(op, "rope_cos_sin", f"a table of >= max_seqlen_k={max_seqlen_k} positions",
                  f"shape {tuple(rope_cos_sin.shape)}")
    if not isinstance(rope_neox, bool):
        fail(op, "rope_neox", "a bool", type(rope_neox).__name__, TypeError)
    if out is not None:
        tensor(op, "out", out, ndim=3, dtypes=(q.dtype,), device=dev)
        shape(op, "out", out, q.shape)
        unit_last_stride(op, "out", out)
    if not isinstance(return_lse, bool):
        fail(op, "return_lse", "a bool", type(return_lse).__name__, TypeError)


def values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, window):
    """Value checks (one device->host sync). Only table entries a sequence needs are checked."""
    op = "paged_attention"
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    cu = cu_seqlens_q.long().cpu()
    lens = seq_lens.long().cpu()
    if cu[0].item() != 0:
        fail(op, "cu_seqlens_q", "a prefix sum starting at 0", f"cu_seqlens_q[0]={cu[0].item()}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens < 0).any()):
        b = int((q_lens < 0).nonzero()[0])
        fail(op, "cu_seqlens_q", "non-decreasing", f"cu_seqlens_q[{b}]={cu[b].item()} > cu_seqlens_q[{b + 1}]={cu[b + 1].item()}")
    if cu[-1].item() != q.shape[0]:
        fail(op, "cu_seqlens_q", f"ending at q.shape[0]={q.shape[0]}", f"cu_seqlens_q[-1]={cu[-1].item()}")
    if len(q_lens) and int(q_lens.max()) > max_seqlen_q:
        fail(op, "max_seqlen_q", f">= the longest query segment ({int(q_lens.max())})", max_seqlen_q)
    if bool((lens < q_lens).any()):
        b = int((lens < q_lens).nonzero()[0])
        fail(op, "seq_lens", f"at least each sequence's query count (seq_lens[{b}] >= {int(q_lens[b])})", int(lens[b]))
    if len(lens) and int(lens.max()) > max_seqlen_k:
        fail(op, "max_seqlen_k", f">= the longest sequence ({int(lens.max())})", max_seqlen_k)
    capacity = block_table.shape[1] * block_size
    if bool((lens > capacity).any()):
        b = int((lens > capacity).nonzero()[0])
        fail(op, "seq_lens", f"<= the block table's capacity {capacity} tokens", f"seq_lens[{b}]={int(lens[b])}")
    # Blocks holding keys that some query can see: [first_blk, last_blk] (see reference.visible_key_range).
    lo = torch.zeros_like(lens)
    if window is not None:
        lo = (lens - q_lens - window + 1).clamp(min=0)
    first_blk = lo // block_size
    last_blk = (lens - 1) // block_size
    cols = torch.arange(block_table.shape[1])
    needed = (cols[None] >= first_blk[:, None]) & (cols[None] <= last_blk[:, None]) & (q_lens > 0)[:, None]
    table = block_table.cpu()
    bad = needed & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, c = (int(x) for x in bad.nonzero()[0])
        fail(op, "block_table", f"in [0, num_blocks={num_blocks}) where sequence {b} needs it",
              f"block_table[{b}, {c}]={int(table[b, c])}")
