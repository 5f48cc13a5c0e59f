"""Argument checks shared by the public ops.

Two levels, both run before anything is written:

* *structure* (always, free): types, ranks, shapes, dtypes, devices, scalar arguments;
* *values* (``check=True``, the default; needs a device->host sync): block-table entries that a
  sequence needs, ``seq_lens`` against capacity, ``cu_seqlens_q`` monotonic and matching ``q``,
  ``slot_mapping`` range and uniqueness. kvmem's own hot path, fed by ``plan()``, passes
  ``check=False``.

Every failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value)
whose message names the op, the argument and what was expected.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
QUANT_CACHE_DTYPES = FLOAT_DTYPES + FP8_DTYPES  # cache dtypes allowed when k_scale/v_scale are given


def _fail(op: str, arg: str, expected: str, got, exc=ValueError):
    raise exc(f"{op}: argument '{arg}' must be {expected}, got {got}")


def tensor(op: str, arg: str, t, *, ndim: int, dtypes: Sequence[torch.dtype], device=None, like: str = "q"):
    if not isinstance(t, torch.Tensor):
        _fail(op, arg, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dim() != ndim:
        _fail(op, arg, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, arg, names, str(t.dtype).replace("torch.", ""), TypeError)
    if device is not None and t.device != device:
        _fail(op, arg, f"on device {device} (like {like})", t.device)


def shape(op: str, arg: str, t: torch.Tensor, expected: Sequence[int]):
    if tuple(t.shape) != tuple(expected):
        _fail(op, arg, f"of shape {tuple(expected)}", f"shape {tuple(t.shape)}")


def unit_last_stride(op: str, arg: str, t: torch.Tensor):
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, arg, "unit-stride in its last dimension", f"stride {t.stride()}")


def host_int(op: str, arg: str, x, *, minimum: int = 0):
    if isinstance(x, bool) or not isinstance(x, int):
        _fail(op, arg, "a host int (not a tensor)", type(x).__name__, TypeError)
    if x < minimum:
        _fail(op, arg, f">= {minimum}", x)


def paged_attention_structure(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
    scale, causal, window, softcap, sink_logits, k_scale, v_scale, out, return_lse,
    rope_cos_sin=None, rope_neox=True,
):
    op = "paged_attention"
    tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    dev = q.device
    unit_last_stride(op, "q", q)
    cache_dtypes = QUANT_CACHE_DTYPES if k_scale is not None else (q.dtype,)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        tensor(op, name, c, ndim=4, dtypes=cache_dtypes, device=dev)
        unit_last_stride(op, name, c)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        _fail(op, "v_cache", f"of k_cache's shape {tuple(k_cache.shape)}", f"shape {tuple(v_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        _fail(op, "q", f"of head_dim {cache_head_dim} (the cache's)", f"head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        _fail(op, "q", f"a number of heads divisible by the cache's num_kv_heads={num_kv_heads}",
              f"{num_heads} heads")
    if block_size < 1:
        _fail(op, "k_cache", "a cache with block_size >= 1", f"shape {tuple(k_cache.shape)}")
    tensor(op, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
    tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    batch = seq_lens.shape[0]
    if block_table.shape[0] != batch:
        _fail(op, "block_table", f"of {batch} rows (one per sequence in seq_lens)", f"shape {tuple(block_table.shape)}")
    tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=dev)
    shape(op, "cu_seqlens_q", cu_seqlens_q, (batch + 1,))
    host_int(op, "max_seqlen_q", max_seqlen_q)
    host_int(op, "max_seqlen_k", max_seqlen_k)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        _fail(op, "scale", "a finite float > 0", scale)
    if not isinstance(causal, bool):
        _fail(op, "causal", "a bool", type(causal).__name__, TypeError)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            _fail(op, "window", "None or an int", type(window).__name__, TypeError)
        if window < 1:
            _fail(op, "window", "None or a positive number of keys", window)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
            _fail(op, "softcap", "None or a finite float > 0", softcap)
    if sink_logits is not None:
        tensor(op, "sink_logits", sink_logits, ndim=1, dtypes=(torch.float32,), device=dev)
        shape(op, "sink_logits", sink_logits, (num_heads,))
    kv_scales(op, k_scale, v_scale, num_kv_heads, dev)
    if rope_cos_sin is not None:
        tensor(op, "rope_cos_sin", rope_cos_sin, ndim=2, dtypes=(torch.float32,), device=dev)
        rot = rope_cos_sin.shape[1]
        if rot < 2 or rot % 2 or rot > head_dim:
            _fail(op, "rope_cos_sin", f"[num_positions, rot_dim] with rot_dim even and in [2, head_dim={head_dim}]",
                  f"shape {tuple(rope_cos_sin.shape)}")
        if isinstance(max_seqlen_k, int) and rope_cos_sin.shape[0] < max_seqlen_k:
            _fail(op, "rope_cos_sin", f"a table of >= max_seqlen_k={max_seqlen_k} positions",
                  f"shape {tuple(rope_cos_sin.shape)}")
    if not isinstance(rope_neox, bool):
        _fail(op, "rope_neox", "a bool", type(rope_neox).__name__, TypeError)
    if out is not None:
        tensor(op, "out", out, ndim=3, dtypes=(q.dtype,), device=dev)
        shape(op, "out", out, q.shape)
        unit_last_stride(op, "out", out)
    if not isinstance(return_lse, bool):
        _fail(op, "return_lse", "a bool", type(return_lse).__name__, TypeError)


def kv_scales(op, k_scale, v_scale, num_kv_heads, dev):
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None:
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.device != dev:
                _fail(op, name, f"None or an fp32 tensor on {dev}", s if not isinstance(s, torch.Tensor) else f"{s.dtype} on {s.device}", TypeError)
            if s.dim() not in (0, 1) or (s.dim() == 1 and s.shape[0] != num_kv_heads):
                _fail(op, name, f"a 0-d tensor or of shape ({num_kv_heads},)", f"shape {tuple(s.shape)}")
    if (k_scale is None) != (v_scale is None):
        _fail(op, "v_scale" if k_scale is not None else "k_scale", "given together with the other scale", None)


def paged_attention_values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, window):
    """Value checks (one device->host sync). Only table entries a sequence needs are checked."""
    op = "paged_attention"
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    cu = cu_seqlens_q.long().cpu()
    lens = seq_lens.long().cpu()
    if cu[0].item() != 0:
        _fail(op, "cu_seqlens_q", "a prefix sum starting at 0", f"cu_seqlens_q[0]={cu[0].item()}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens < 0).any()):
        b = int((q_lens < 0).nonzero()[0])
        _fail(op, "cu_seqlens_q", "non-decreasing", f"cu_seqlens_q[{b}]={cu[b].item()} > cu_seqlens_q[{b + 1}]={cu[b + 1].item()}")
    if cu[-1].item() != q.shape[0]:
        _fail(op, "cu_seqlens_q", f"ending at q.shape[0]={q.shape[0]}", f"cu_seqlens_q[-1]={cu[-1].item()}")
    if len(q_lens) and int(q_lens.max()) > max_seqlen_q:
        _fail(op, "max_seqlen_q", f">= the longest query segment ({int(q_lens.max())})", max_seqlen_q)
    if bool((lens < q_lens).any()):
        b = int((lens < q_lens).nonzero()[0])
        _fail(op, "seq_lens", f"at least each sequence's query count (seq_lens[{b}] >= {int(q_lens[b])})", int(lens[b]))
    if len(lens) and int(lens.max()) > max_seqlen_k:
        _fail(op, "max_seqlen_k", f">= the longest sequence ({int(lens.max())})", max_seqlen_k)
    capacity = block_table.shape[1] * block_size
    if bool((lens > capacity).any()):
        b = int((lens > capacity).nonzero()[0])
        _fail(op, "seq_lens", f"<= the block table's capacity {capacity} tokens", f"seq_lens[{b}]={int(lens[b])}")
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
        _fail(op, "block_table", f"in [0, num_blocks={num_blocks}) where sequence {b} needs it",
              f"block_table[{b}, {c}]={int(table[b, c])}")


def cache_write_structure(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    op = "cache_write"
    quant = k_scale is not None or v_scale is not None
    tensor(op, "k_cache", k_cache, ndim=4, dtypes=QUANT_CACHE_DTYPES if quant else FLOAT_DTYPES)
    dev = k_cache.device
    tensor(op, "v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev, like="k_cache")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        _fail(op, "v_cache", f"of k_cache's shape {tuple(k_cache.shape)}", f"shape {tuple(v_cache.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        unit_last_stride(op, name, c)
    for name, t in (("k", k), ("v", v)):
        tensor(op, name, t, ndim=3, dtypes=FLOAT_DTYPES if quant else (k_cache.dtype,), device=dev, like="k_cache")
        unit_last_stride(op, name, t)
        if tuple(t.shape[1:]) != tuple(k_cache.shape[2:]):
            _fail(op, name, f"of shape [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}] (the cache's heads and head_dim)",
                  f"shape {tuple(t.shape)}")
    if v.shape[0] != k.shape[0]:
        _fail(op, "v", f"of k's shape {tuple(k.shape)}", f"shape {tuple(v.shape)}")
    if v.dtype != k.dtype:
        _fail(op, "v", f"of k's dtype {k.dtype}", v.dtype, TypeError)
    tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=dev, like="k_cache")
    shape(op, "slot_mapping", slot_mapping, (k.shape[0],))
    kv_scales(op, k_scale, v_scale, k_cache.shape[2], dev)


def cache_write_values(k_cache, slot_mapping):
    op = "cache_write"
    capacity = k_cache.shape[0] * k_cache.shape[1]
    slots = slot_mapping.cpu()
    bad = (slots < -1) | (slots >= capacity)
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        _fail(op, "slot_mapping", f"in [-1, num_blocks*block_size={capacity})", f"slot_mapping[{t}]={int(slots[t])}")
    used = slots[slots >= 0]
    if used.numel() != used.unique().numel():
        _fail(op, "slot_mapping", "free of duplicate slots (-1 excepted)", "a slot written twice")


def merge_states_structure(out_a, lse_a, out_b, lse_b):
    op = "merge_states"
    tensor(op, "out_a", out_a, ndim=3, dtypes=FLOAT_DTYPES)
    dev = out_a.device
    tensor(op, "out_b", out_b, ndim=3, dtypes=(out_a.dtype,), device=dev, like="out_a")
    shape(op, "out_b", out_b, out_a.shape)
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        unit_last_stride(op, name, t)
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        tensor(op, name, t, ndim=2, dtypes=(torch.float32,), device=dev, like="out_a")
        shape(op, name, t, out_a.shape[:2])


def optional_tensor_device(op: str, arg: str, t: Optional[torch.Tensor], device):
    if t is not None and t.device != device:
        _fail(op, arg, f"on device {device}", t.device)
