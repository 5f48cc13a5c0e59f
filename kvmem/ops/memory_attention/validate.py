"""Argument checks of ``memory_attention``: structure (always) and values (``check=True``, one sync).

Every failure is a ``TypeError`` or ``ValueError`` naming the op, the argument and what was
expected, raised before anything is written.
"""

from __future__ import annotations

import torch

from kvmem.ops import _validate as v
from kvmem.ops._validate import _fail

OP = "memory_attention"


def structure(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
    sink_blocks, window_start, bank_table, selected, scale, softcap, sink_logits, k_scale, v_scale,
    rope_cos_sin, rope_neox, return_lse, block_mass,
):
    # The paged part (q, caches, block_table, seq_lens, cu_seqlens_q, scalars, scales, RoPE table)
    # follows paged_attention's rules, reported under this op's name.
    try:
        v.paged_attention_structure(
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
            scale, True, None, softcap, sink_logits, k_scale, v_scale, None, return_lse, None, rope_neox)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("paged_attention:", f"{OP}:", 1)) from None
    dev = q.device
    batch, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    v.host_int(OP, "sink_blocks", sink_blocks)
    v.tensor(OP, "window_start", window_start, ndim=1, dtypes=(torch.int32,), device=dev)
    v.shape(OP, "window_start", window_start, (batch,))
    v.tensor(OP, "bank_table", bank_table, ndim=2, dtypes=(torch.int32,), device=dev)
    if bank_table.shape[0] != batch:
        _fail(OP, "bank_table", f"of {batch} rows (one per sequence in seq_lens)", f"shape {tuple(bank_table.shape)}")
    v.tensor(OP, "selected", selected, ndim=3, dtypes=(torch.int32,), device=dev)
    if tuple(selected.shape[:2]) != (batch, num_kv_heads):
        _fail(OP, "selected", f"of shape ({batch}, {num_kv_heads}, top_k) (batch, the cache's num_kv_heads)",
              f"shape {tuple(selected.shape)}")
    if rope_cos_sin is not None:
        v.tensor(OP, "rope_cos_sin", rope_cos_sin, ndim=2, dtypes=(torch.float32,), device=dev)
        rot, head_dim = rope_cos_sin.shape[1], q.shape[2]
        if rot < 2 or rot % 2 or rot > head_dim:
            _fail(OP, "rope_cos_sin", f"[num_positions, rot_dim] with rot_dim even and in [2, head_dim={head_dim}]",
                  f"shape {tuple(rope_cos_sin.shape)}")
    if block_mass is not None:
        v.tensor(OP, "block_mass", block_mass, ndim=3, dtypes=(torch.float32,), device=dev)
        v.shape(OP, "block_mass", block_mass, (batch, num_kv_heads, bank_table.shape[1]))


def values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
           sink_blocks, window_start, bank_table, selected, rope_cos_sin):
    """Value checks (one device->host sync); only the table entries a row reads are checked."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    cu, lens = cu_seqlens_q.long().cpu(), seq_lens.long().cpu()
    if cu[0].item() != 0:
        _fail(OP, "cu_seqlens_q", "a prefix sum starting at 0", f"cu_seqlens_q[0]={cu[0].item()}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens < 0).any()):
        b = int((q_lens < 0).nonzero()[0])
        _fail(OP, "cu_seqlens_q", "non-decreasing", f"cu_seqlens_q[{b}]={cu[b].item()} > cu_seqlens_q[{b + 1}]")
    if cu[-1].item() != q.shape[0]:
        _fail(OP, "cu_seqlens_q", f"ending at q.shape[0]={q.shape[0]}", f"cu_seqlens_q[-1]={cu[-1].item()}")
    if len(q_lens) and int(q_lens.max()) > max_seqlen_q:
        _fail(OP, "max_seqlen_q", f">= the longest query segment ({int(q_lens.max())})", max_seqlen_q)
    if len(lens) and int(lens.max()) > max_seqlen_k:
        _fail(OP, "max_seqlen_k", f">= the longest sequence ({int(lens.max())})", max_seqlen_k)
    tables, banks = block_table.cpu().tolist(), bank_table.cpu().tolist()
    starts, chosen = window_start.cpu().tolist(), selected.cpu().tolist()
    max_bank = bank_table.shape[1]
    max_position = 0
    for b, seq_len in enumerate(lens.tolist()):
        q_len, w0 = int(q_lens[b]), starts[b]
        if seq_len < q_len:
            _fail(OP, "seq_lens", f"at least each sequence's query count (seq_lens[{b}] >= {q_len})", seq_len)
        if w0 < sink_blocks:
            _fail(OP, "window_start", f">= sink_blocks={sink_blocks}", f"window_start[{b}]={w0}")
        if w0 != sink_blocks and w0 * block_size > seq_len - q_len:
            _fail(OP, "window_start", f"sink_blocks, or a block at or before row {b}'s first query "
                  f"(<= {(seq_len - q_len) // block_size})", f"window_start[{b}]={w0}")
        n_pages = -(-seq_len // block_size)
        if n_pages > len(tables[b]):
            _fail(OP, "seq_lens", f"<= the block table's capacity {len(tables[b]) * block_size} tokens",
                  f"seq_lens[{b}]={seq_len}")
        read = list(range(min(sink_blocks, n_pages))) + list(range(w0, n_pages))
        for c in read:
            if q_len and not 0 <= tables[b][c] < num_blocks:
                _fail(OP, "block_table", f"in [0, num_blocks={num_blocks}) where sequence {b} needs it",
                      f"block_table[{b}, {c}]={tables[b][c]}")
        row_pages = {tables[b][c] for c in read}
        counts = set()
        for h in range(selected.shape[1]):
            entries = chosen[b][h]
            used = [i for i in entries if i >= 0]
            counts.add(len(used))
            where = f"selected[{b}, {h}]"
            if any(i < -1 or i >= max_bank for i in entries):
                _fail(OP, "selected", f"positions in [-1, max_bank={max_bank})", f"{where}={entries}")
            if entries[:len(used)] != used or any(x >= y for x, y in zip(used, used[1:])):
                _fail(OP, "selected", "ascending unique positions, -1 padding last", f"{where}={entries}")
            if used and w0 * block_size > seq_len - q_len:
                _fail(OP, "selected", f"empty (-1) while row {b}'s queries start before its window "
                      "(selected blocks lie between the sinks and the window)", f"{where}={entries}")
            if not q_len:
                continue
            pages = [banks[b][i] for i in used]
            for i, page in zip(used, pages):
                if not 0 <= page < num_blocks:
                    _fail(OP, "bank_table", f"in [0, num_blocks={num_blocks}) where {where} selects it",
                          f"bank_table[{b}, {i}]={page}")
                if page in row_pages:
                    _fail(OP, "bank_table", f"pages apart from row {b}'s sink and window pages (a key counted once)",
                          f"bank_table[{b}, {i}]={page}")
            if len(set(pages)) != len(pages):
                _fail(OP, "bank_table", f"distinct pages where {where} selects them", f"pages {pages}")
        if rope_cos_sin is not None and len(counts) > 1:
            _fail(OP, "selected", f"the same number of non-empty entries for every KV head of row {b} "
                  "with rope_cos_sin (the query's compacted position depends on it)", f"counts {sorted(counts)}")
        n_sel = max(counts) if counts else 0
        compacted_len = seq_len if w0 * block_size >= seq_len else seq_len - (w0 - sink_blocks - n_sel) * block_size
        max_position = max(max_position, compacted_len)
    if rope_cos_sin is not None and rope_cos_sin.shape[0] < max_position:
        _fail(OP, "rope_cos_sin", f"a table of >= {max_position} positions (the longest compacted row)",
              f"shape {tuple(rope_cos_sin.shape)}")
