"""The Triton paged-attention tests' problems (tests/ops/test_paged_attention_triton.py): a paged
problem whose caches hold NaN wherever no visible key lives, poisoned outputs, the check against
the reference, and the compiled full product a GPU runs (``gpu_full_product``).
"""

from __future__ import annotations

import importlib
import math

import torch

import backends  # noqa: F401  (first: TRITON_INTERPRET=1 where there is no GPU, before triton is imported)
from kvmem.ops import reference as ref
from tolerances import TRITON_LSE as LSE_TOL  # tests/tolerances.py
from tolerances import TRITON_OUT as TOL

# Each op folder's Triton module (kvmem.ops.<op> is the public function: import modules by path).
pa = importlib.import_module("kvmem.ops.paged_attention.triton")
cfgs = importlib.import_module("kvmem.ops.paged_attention.configs")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def build(q_lens, kv_lens, *, D, bs, Hkv, G, dtype, causal=True, window=None, softcap=None,
          sink=False, table="poison", layout="plain", q_layout="plain", seed=0, device="cpu"):
    """A paged problem whose caches hold NaN wherever no visible key lives."""
    gen = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    Hq = Hkv * G
    nblk = [-(-k // bs) for k in kv_lens]
    max_blocks = max(nblk + [1]) + 2
    num_blocks = sum(nblk) + 3  # one all-NaN poison page and spares
    perm = torch.randperm(num_blocks, generator=gen)
    poison = int(perm[-1])
    bt = torch.full((B, max_blocks), -1 if table == "neg1" else poison, dtype=torch.int32)
    shape = (num_blocks, bs, Hkv, D)
    if layout == "kv_interleaved":  # k and v caches are views into one [N, 2, bs, Hkv, D] buffer
        buf = torch.empty((num_blocks, 2, bs, Hkv, D), dtype=dtype)
        kc, vc = buf[:, 0], buf[:, 1]
    elif layout == "padded_heads":  # head stride D + 16
        kc = torch.empty((num_blocks, bs, Hkv, D + 16), dtype=dtype)[..., :D]
        vc = torch.empty((num_blocks, bs, Hkv, D + 16), dtype=dtype)[..., :D]
    else:
        kc = torch.empty(shape, dtype=dtype)
        vc = torch.empty(shape, dtype=dtype)
    kc.copy_(torch.randn(shape, generator=gen))
    vc.copy_(torch.randn(shape, generator=gen))
    real = torch.zeros(num_blocks, bs, dtype=torch.bool)  # slots holding a visible key
    used = 0
    for b in range(B):
        lo, hi = ref.visible_key_range(kv_lens[b], q_lens[b], causal, window)
        pages = perm[used: used + nblk[b]]
        used += nblk[b]
        if hi <= lo:
            continue
        for blk in range(lo // bs, (hi - 1) // bs + 1):  # only the needed pages are mapped
            page = int(pages[blk])
            bt[b, blk] = page
            real[page, max(lo - blk * bs, 0): min(hi - blk * bs, bs)] = True
    kc[~real] = math.nan  # every other slot (and the poison page) holds NaN
    vc[~real] = math.nan
    T = sum(q_lens)
    if q_layout == "qkv":  # q is a view into a fused qkv projection output
        q = torch.randn(T, Hq + 2 * Hkv, D, generator=gen).to(dtype)[:, :Hq]
    else:
        q = torch.randn(T, Hq, D, generator=gen).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(kv_lens, dtype=torch.int32)
    sinks = (torch.randn(Hq, generator=gen) * 2).float() if sink else None
    d = dict(q=q, k_cache=kc, v_cache=vc, block_table=bt, seq_lens=sl, cu_seqlens_q=cu,
             max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens), scale=D ** -0.5, causal=causal,
             window=window, softcap=softcap, sink_logits=sinks)
    if device != "cpu":
        d = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}
    return d


def reference(p):
    return ref.paged_attention(
        p["q"], p["k_cache"], p["v_cache"], p["block_table"], p["seq_lens"], p["cu_seqlens_q"],
        p["max_seqlen_q"], p["max_seqlen_k"], scale=p["scale"], causal=p["causal"],
        window=p["window"], softcap=p["softcap"], sink_logits=p["sink_logits"])


def poisoned_outputs(p, out_layout="plain"):
    T, Hq, D = p["q"].shape
    if out_layout == "padded":
        out = torch.full((T, Hq, D + 16), math.nan, dtype=p["q"].dtype, device=p["q"].device)[..., :D]
    else:
        out = torch.full((T, Hq, D), math.nan, dtype=p["q"].dtype, device=p["q"].device)
    lse = torch.full((T, Hq), math.nan, dtype=torch.float32, device=p["q"].device)
    return out, lse


def args_of(p):
    return (p["q"], p["k_cache"], p["v_cache"], p["block_table"], p["seq_lens"], p["cu_seqlens_q"],
            p["max_seqlen_q"], p["max_seqlen_k"], p["scale"], p["causal"], p["window"] or 0,
            p["softcap"] or 0.0, p["sink_logits"])


def check(p, out, lse, tag=""):
    o_ref, l_ref = reference(p)
    tol = TOL[p["q"].dtype]
    assert not torch.isnan(out).any(), f"{tag}: NaN in out"
    torch.testing.assert_close(out.float().cpu(), o_ref.float().cpu(), **tol, msg=lambda m: f"{tag} out: {m}")
    if lse is not None:
        torch.testing.assert_close(lse.cpu(), l_ref.cpu(), **LSE_TOL, equal_nan=False,
                                   msg=lambda m: f"{tag} lse: {m}")


def gpu_full_product(dev="cuda", max_groups=None):
    """Every dtype x head dim x page size x group x step kind x every config, compiled.

    Groups 12 and 16 and speculative multi-token decode steps (q_len 2..8, as many as fit the
    64-row decode tile) run the decode kernels only: prefill maps a head to its KV head by a
    division, which groups 1..8 already cover."""
    import time

    t0 = time.time()
    arch = cfgs.arch_of(torch.device(dev))
    n = 0
    for dtype in (F16, BF16, F32):
        for D in cfgs.SUPPORTED_HEAD_DIMS:
            bd = cfgs.block_d(D)
            for bs in (1, 8, 16, 32, 64, 128, 256):
                for G in (1, 3, 4, 7, 8, 12, 16):
                    if max_groups is not None and n >= max_groups:
                        return
                    seed = n
                    n += 1
                    kinds = [
                        ("prefill", [130, 17], [130, 300], dict(window=None, softcap=None, sink=False)),
                        ("mixed", [1, 70, 1], [513, 90, 33], dict(window=64, softcap=30.0, sink=True)),
                    ]
                    for kind, ql, kl, extra in kinds if G <= 8 else []:
                        p = build(ql, kl, D=D, bs=bs, Hkv=2, G=G, dtype=dtype, seed=seed, device=dev, **extra)
                        a = args_of(p)
                        for c in cfgs.prefill_configs(dtype, bd, arch):
                            out, lse = poisoned_outputs(p)
                            pa.launch_prefill(out, lse, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[8],
                                              a[9], a[10], a[11], a[12], cfg=c)
                            check(p, out, lse, f"gpu {kind} {dtype} D{D} bs{bs} G{G} {c}")
                    q_spec = min(cfgs.DECODE_KERNEL_MAX_SEQLEN_Q, cfgs.DECODE_ROWS[-1] // G)
                    steps = [("decode", [1, 1, 1], [1000, 37, 1], (None, 1, 3, 40)),
                             ("spec", [2, q_spec, 1], [300, 64 + q_spec, 40], (None, 3))]
                    for kind, ql, kl, split_counts in steps:
                        assert cfgs.use_decode(max(ql), G)
                        p = build(ql, kl, D=D, bs=bs, Hkv=2, G=G, dtype=dtype, seed=seed, device=dev,
                                  window=None if G % 2 else 200, sink=G in (7, 12), softcap=20.0 if G == 3 else None)
                        a = args_of(p)
                        rows = cfgs.decode_rows(G * max(ql), dtype, bd)
                        for c in cfgs.decode_configs(dtype, bd, arch, rows):
                            for splits in split_counts:
                                out, lse = poisoned_outputs(p)
                                pa.launch_decode(out, lse, *a[:8], a[8], a[9], a[10], a[11], a[12], cfg=c,
                                                 num_splits=splits)
                                check(p, out, lse, f"gpu {kind} {dtype} D{D} bs{bs} G{G} {c} splits={splits}")
                        # the public entry point (heuristic configs)
                        out, lse = poisoned_outputs(p)
                        pa.paged_attention(out, lse, *a)
                        check(p, out, lse, f"gpu entry {kind} {dtype} D{D} bs{bs} G{G}")
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"gpu full product: {n} shape groups OK in {time.time() - t0:.0f}s")
