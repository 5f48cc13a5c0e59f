"""A toy two-layer attention stack served from kvmem's paged cache: plan once per step, write the
new K/V into each layer's pages, attend — prefill, then a few decode steps for a ragged batch,
with one full-attention layer and one sliding-window layer. Checked against dense attention.

    python examples/paged_decode.py
"""

import math

import torch

import kvmem
from kvmem.cache import KVCacheManager, LayerGroupSpec

torch.manual_seed(0)
HQ, HKV, D, WINDOW = 8, 2, 64, 24
groups = [LayerGroupSpec("full", (0,)), LayerGroupSpec("sliding", (1,), window=WINDOW)]
manager = KVCacheManager(num_blocks=64, block_size=16, groups=groups)
pools = manager.make_pools(HKV, D, dtype=torch.float32, fill=math.nan)  # layer -> (k_cache, v_cache)

prompts = {"a": 37, "b": 5}
history = {s: {layer: ([], [], []) for layer in (0, 1)} for s in prompts}  # q, k, v per layer
for s in prompts:
    manager.add_sequence(s)


def dense(q, k, v, window):
    """Causal (+ window) attention of the last len(q) positions over all of k/v (the check)."""
    n, m = q.shape[0], k.shape[0]
    pos_q, pos_k = torch.arange(m - n, m)[:, None], torch.arange(m)[None, :]
    mask = (pos_k <= pos_q) & ((pos_k > pos_q - window) if window else True)
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, -math.inf).softmax(-1), v)


steps = [dict(prompts)] + [{"a": 1, "b": 1}] * 20
for step, new in enumerate(steps):
    seq_ids, counts = list(new), list(new.values())
    plan = manager.plan(seq_ids, counts)  # one host->device upload per group, no per-layer host work
    manager.apply_copies(pools)  # copy-on-write (none here; needed after fork())
    worst = 0.0
    for layer in (0, 1):
        meta = plan.for_layer(layer)
        t = sum(counts)
        q, k, v = torch.randn(t, HQ, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)
        k_cache, v_cache = pools[layer]
        kvmem.cache_write(k, v, k_cache, v_cache, meta.slot_mapping, check=False)
        out = kvmem.paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.cu_seqlens_q,
                                    meta.max_seqlen_q, meta.max_seqlen_k, window=meta.window, check=False)
        start = 0
        for s, n in zip(seq_ids, counts):
            hq, hk, hv = history[s][layer]
            hq.append(q[start:start + n]); hk.append(k[start:start + n]); hv.append(v[start:start + n])
            expect = dense(q[start:start + n], torch.cat(hk), torch.cat(hv), meta.window)
            worst = max(worst, (out[start:start + n] - expect).abs().max().item())
            start += n
    usage = {g: f"{u.blocks_used} blocks/{u.num_tokens} tokens" for g, u in manager.usage().items()}
    print(f"step {step:2d}: lens {[manager.seq_len(s) for s in seq_ids]} max|paged-dense| {worst:.2e} usage {usage}")
    assert worst < 1e-4, worst
print("paged attention matches dense attention at every step")
