"""Quantised and cross-dtype caches on the Triton backend (under the interpreter on CPU tensors):
``cache_write`` bit for bit against the reference (float8 codes compared as uint8), and
``paged_attention`` (decode, prefill, mixed batches) against the reference given the SAME cache
contents, so that only fp32 arithmetic order differs (tolerances: tests/tolerances.py).

A pairwise subset over: float8 format (e4m3fn, e5m2), 0-d / per-KV-head scales, GQA group, head
dim, page size, shuffled block tables and unused slots holding float8 NaN codes (0x7F), decode /
prefill / mixed batches / split decode, RoPE on load (NeoX, GPT-J, partial), window / softcap /
sink, float caches with scales and float caches of another dtype than q.
"""

from __future__ import annotations

import importlib
import math
import zlib

import pytest
import torch

import backends  # noqa: F401  (first: TRITON_INTERPRET=1 where there is no GPU, before triton is imported)
from kvmem.dispatch import Call, capability
from kvmem.ops import reference as ref
from kvmem.ops._common import encode
from tolerances import TRITON_LSE, TRITON_OUT
from triton_problems import args_of, build, cfgs, pa, poisoned_outputs

cw = importlib.import_module("kvmem.ops.cache_write.triton")  # kvmem.ops.cache_write is the function

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(autouse=True)
def _interpreter_only(request):
    if "gpu" not in request.keywords and not cfgs.interpreting():
        pytest.skip("Triton interpreter test (CPU tensors): run with TRITON_INTERPRET=1")


def _scales(kind, hkv, gen, spread=1.0):
    """(k_scale, v_scale): None, 0-d, [hkv] fp32 ("head"), or 0-d and [hkv] ("mix")."""
    if kind is None:
        return None, None
    if kind == "0d":
        return torch.tensor(0.37 * spread), torch.tensor(1.9 * spread)
    if kind == "mix":  # a 0-d k_scale beside a per-head v_scale
        return torch.tensor(0.37 * spread), (torch.rand(hkv, generator=gen) + 0.5) * spread
    return ((torch.rand(hkv, generator=gen) + 0.2) * spread, (torch.rand(hkv, generator=gen) + 0.5) * spread)


# ---------------------------------------------------------------------------------------------
# cache_write: bit-exact against the reference
# ---------------------------------------------------------------------------------------------

# (cache dtype, k/v dtype, scales, head dim, page size, KV heads, k/v layout)
WRITE_CASES = [
    (E4M3, F32, "0d", 128, 16, 2, "plain"),
    (E4M3, BF16, "head", 64, 1, 3, "qkv"),
    (E4M3, F16, "head", 80, 8, 1, "plain"),
    (E5M2, F32, "mix", 96, 32, 4, "qkv"),
    (E5M2, BF16, "0d", 256, 8, 2, "plain"),
    (E5M2, F16, "0d", 64, 16, 3, "qkv"),
    (BF16, F32, "head", 128, 16, 2, "plain"),  # float caches with scales: clamp to the format's max
    (F16, F32, "0d", 64, 8, 3, "qkv"),
    (F32, BF16, "head", 80, 1, 2, "plain"),
    (BF16, F32, None, 128, 8, 2, "qkv"),  # another float dtype, no scales: round to nearest even
    (BF16, F16, None, 64, 16, 1, "plain"),
    (F16, BF16, None, 96, 8, 2, "plain"),
    (F16, F32, None, 256, 32, 1, "qkv"),
]


def _write_inputs(src, T, hkv, D, layout, gen, spread):
    """k, v [T, hkv, D] of ``src`` (strided slices of a qkv buffer for "qkv"), of magnitudes over
    many binades, with out-of-range values, +-inf, NaN, +-0 and float8 midpoints in them."""
    if layout == "qkv":
        buf = torch.randn(T, 2 + 2 * hkv, D, generator=gen)
        k, v = buf[:, 2:2 + hkv], buf[:, 2 + hkv:]
    else:
        k, v = torch.randn(T, hkv, D, generator=gen), torch.randn(T, hkv, D, generator=gen)
    for x in (k, v):
        x.mul_(torch.exp2(torch.randint(-20, 12, x.shape, generator=gen).float()) * spread)
        x[0, 0, :8] = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0, 1e30, -1e30, 1e-40])
        x[1, 0, :6] = torch.tensor([17.0, 18.0, 19.0, -0.4375, 0.001953125 * 1.5, 464.0]) * spread
    return k.to(src), v.to(src)


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_cache_write_bit_exact(case, dev="cpu"):
    dtype, src, scales, D, bs, hkv, layout = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) % 1000)
    T = 9
    num_blocks = max(4, -(-2 * T // bs))
    k_scale, v_scale = _scales(scales, hkv, gen)
    k, v = _write_inputs(src, T, hkv, D, layout, gen, 1.0 if scales is None else float(k_scale.mean()))
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    slots[[3, 6]] = -1
    kc = torch.full((num_blocks, bs, hkv, D), math.nan).to(dtype)
    vc = kc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref.cache_write(k, v, kc_ref, vc_ref, slots, k_scale, v_scale)
    k, v, kc, vc, slots, k_scale, v_scale = (None if t is None else t.to(dev) for t in (k, v, kc, vc, slots, k_scale, v_scale))
    cw.cache_write(k, v, kc, vc, slots, k_scale, v_scale)
    kc, vc = kc.cpu(), vc.cpu()
    if dtype in (E4M3, E5M2):
        assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
        assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))
    else:  # NaN compare equal (their payload bits are torch's business)
        torch.testing.assert_close(kc, kc_ref, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(vc, vc_ref, equal_nan=True, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# paged_attention: the same cache contents through the kernels and the reference
# ---------------------------------------------------------------------------------------------


def _rope_table(num_positions, rot_dim):
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    ang = torch.arange(num_positions).float()[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).contiguous()


def _store(c, cache_dtype, scale, layout_buf=None):
    """The float problem cache ``c`` as ``cache_dtype`` content: ``encode(c / scale)`` (float8:
    the unused slots' NaN become code 0x7F), or a plain cast without scale."""
    x = c.float()
    if scale is not None:
        x = encode(x / (scale.reshape(-1, 1) if scale.dim() == 1 else scale), cache_dtype)
    x = x.to(cache_dtype)
    if layout_buf is not None:
        layout_buf.copy_(x)
        return layout_buf
    return x


def quantised_problem(q_lens, kv_lens, *, D, bs, Hkv, G, q_dtype, cache, scales=None, rope=None, seed=0,
                      layout="plain", **kw):
    """A paged problem (triton_problems.build: NaN in every slot no visible key lives in,
    shuffled pages) whose caches hold ``cache``-dtype content, with ``scales`` (None, "0d",
    "head") and RoPE on load (None or (rot_dim, neox))."""
    p = build(q_lens, kv_lens, D=D, bs=bs, Hkv=Hkv, G=G, dtype=F32, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    ks, vs = _scales(scales, Hkv, gen, spread=0.5)
    if layout == "kv_interleaved":  # k and v caches: views into one [N, 2, bs, Hkv, D] buffer
        buf = torch.empty((p["k_cache"].shape[0], 2) + tuple(p["k_cache"].shape[1:]), dtype=cache)
        p["k_cache"], p["v_cache"] = _store(p["k_cache"], cache, ks, buf[:, 0]), _store(p["v_cache"], cache, vs, buf[:, 1])
    else:
        p["k_cache"], p["v_cache"] = _store(p["k_cache"], cache, ks), _store(p["v_cache"], cache, vs)
    p["q"] = p["q"].to(q_dtype)
    p["k_scale"], p["v_scale"] = ks, vs
    p["rope_cos_sin"], p["rope_neox"] = (None, True) if rope is None else (_rope_table(max(kv_lens), rope[0]), rope[1])
    return p


def _reference(p):
    return ref.paged_attention(
        p["q"], p["k_cache"], p["v_cache"], p["block_table"], p["seq_lens"], p["cu_seqlens_q"],
        p["max_seqlen_q"], p["max_seqlen_k"], scale=p["scale"], causal=p["causal"], window=p["window"],
        softcap=p["softcap"], sink_logits=p["sink_logits"], k_scale=p["k_scale"], v_scale=p["v_scale"],
        rope_cos_sin=p["rope_cos_sin"], rope_neox=p["rope_neox"])


def _check(p, out, lse, tag):
    o_ref, l_ref = _reference(p)
    assert not torch.isnan(out).any(), f"{tag}: NaN in out"
    torch.testing.assert_close(out.float(), o_ref.float(), **TRITON_OUT[p["q"].dtype], msg=lambda m: f"{tag} out: {m}")
    torch.testing.assert_close(lse, l_ref, **TRITON_LSE, msg=lambda m: f"{tag} lse: {m}")


def _extra(p):
    return (p["k_scale"], p["v_scale"], p["rope_cos_sin"], p["rope_neox"])


NEOX, GPTJ = True, False

# (id, q_lens, kv_lens, dict): pairwise over format, scales, q dtype, head dim, page size, group,
# step kind, RoPE on load, window / softcap / sink, table poisoning and layout.
ATTN_CASES = [
    # float8 caches: decode (split-K, heuristic splits), prefill, chunked prefill, mixed batches
    ("dec-e4m3-0d-bf16-d128-bs16-g4", [1, 1, 1], [40, 129, 7], dict(D=128, bs=16, Hkv=2, G=4, q_dtype=BF16, cache=E4M3, scales="0d")),
    ("dec-e5m2-head-f16-d64-bs8-g1", [1, 1], [70, 33], dict(D=64, bs=8, Hkv=3, G=1, q_dtype=F16, cache=E5M2, scales="head",
                                                            table="neg1")),
    ("dec-e4m3-head-f32-d64-bs1-g8", [1], [45], dict(D=64, bs=1, Hkv=1, G=8, q_dtype=F32, cache=E4M3, scales="head")),
    ("dec-e5m2-mix-bf16-d256-bs32-g2", [1, 1], [50, 3], dict(D=256, bs=32, Hkv=2, G=2, q_dtype=BF16, cache=E5M2, scales="mix")),
    ("pf-e4m3-head-bf16-d64-bs16-g3", [20, 7], [20, 7], dict(D=64, bs=16, Hkv=1, G=3, q_dtype=BF16, cache=E4M3, scales="head")),
    ("pf-e5m2-0d-f32-d128-bs32-g1", [13], [13], dict(D=128, bs=32, Hkv=2, G=1, q_dtype=F32, cache=E5M2, scales="0d")),
    ("pfx-e4m3-0d-f16-d80-bs8-g2", [9, 3], [40, 20], dict(D=80, bs=8, Hkv=2, G=2, q_dtype=F16, cache=E4M3, scales="0d",
                                                          table="neg1")),
    ("pfx-e5m2-mix-f16-d112-bs1-g4", [10], [26], dict(D=112, bs=1, Hkv=2, G=4, q_dtype=F16, cache=E5M2, scales="mix")),
    ("mix-e5m2-head-bf16-d128-bs16-g4", [1, 12, 1], [50, 30, 9], dict(D=128, bs=16, Hkv=2, G=4, q_dtype=BF16, cache=E5M2,
                                                                      scales="head")),
    ("mix-e4m3-head-f16-d256-bs32-g1", [1, 9], [33, 20], dict(D=256, bs=32, Hkv=2, G=1, q_dtype=F16, cache=E4M3, scales="head")),
    ("spec-e4m3-0d-bf16-d64-bs8-g4", [3, 1], [40, 9], dict(D=64, bs=8, Hkv=1, G=4, q_dtype=BF16, cache=E4M3, scales="0d")),
    # with window / softcap / sink, a kv-interleaved cache
    ("dec-e4m3-all-f16-d96-bs8-g3", [1, 1], [60, 12], dict(D=96, bs=8, Hkv=2, G=3, q_dtype=F16, cache=E4M3, scales="head",
                                                           window=20, softcap=5.0, sink=True)),
    ("pf-e5m2-win-bf16-d64-bs16-g2", [18], [40], dict(D=64, bs=16, Hkv=1, G=2, q_dtype=BF16, cache=E5M2, scales="0d",
                                                      window=9, sink=True, layout="kv_interleaved")),
    # RoPE on load after the scale: NeoX / GPT-J, full / partial rotary
    ("rope-dec-e4m3-head-bf16-d128-neox", [1, 1], [60, 17], dict(D=128, bs=16, Hkv=2, G=2, q_dtype=BF16, cache=E4M3,
                                                                 scales="head", rope=(128, NEOX))),
    ("rope-pf-e5m2-0d-f16-d64-gptj32", [15], [30], dict(D=64, bs=8, Hkv=1, G=3, q_dtype=F16, cache=E5M2, scales="0d",
                                                        rope=(32, GPTJ))),
    ("rope-mix-e4m3-0d-f32-d64-neox48", [1, 12], [25, 12], dict(D=64, bs=8, Hkv=2, G=2, q_dtype=F32, cache=E4M3, scales="0d",
                                                              rope=(48, NEOX))),
    ("rope-dec-e5m2-head-f16-d80-gptj", [1], [33], dict(D=80, bs=1, Hkv=1, G=4, q_dtype=F16, cache=E5M2, scales="head",
                                                        rope=(80, GPTJ), softcap=3.0)),
    # float caches with scales, and of another dtype than q (converted on load)
    ("dec-bf16cache-head-bf16-d64", [1, 1], [37, 80], dict(D=64, bs=16, Hkv=2, G=2, q_dtype=BF16, cache=BF16, scales="head")),
    ("pf-f32cache-0d-f16-d128", [11], [30], dict(D=128, bs=8, Hkv=1, G=2, q_dtype=F16, cache=F32, scales="0d")),
    ("dec-f32q-bf16cache-d128", [1, 1], [90, 5], dict(D=128, bs=16, Hkv=2, G=4, q_dtype=F32, cache=BF16)),
    ("pf-f32q-bf16cache-d64", [16, 5], [30, 5], dict(D=64, bs=8, Hkv=1, G=2, q_dtype=F32, cache=BF16, table="neg1")),
    ("mix-bf16q-f32cache-d96", [1, 10], [40, 10], dict(D=96, bs=32, Hkv=1, G=3, q_dtype=BF16, cache=F32)),
    ("dec-f16q-bf16cache-d64", [1], [50], dict(D=64, bs=8, Hkv=1, G=4, q_dtype=F16, cache=BF16)),
    ("rope-pf-f32q-bf16cache-d64", [12], [20], dict(D=64, bs=16, Hkv=1, G=2, q_dtype=F32, cache=BF16, rope=(64, NEOX))),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_paged_attention_quantised(case, dev="cpu"):
    name, q_lens, kv_lens, kw = case
    p = quantised_problem(q_lens, kv_lens, seed=zlib.crc32(name.encode()) % 1000, **kw)
    decode = cfgs.use_decode(max(q_lens), kw["G"])
    assert decode == name.startswith(("dec", "spec", "rope-dec")), "case does not exercise the kernel its name says"
    pd = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in p.items()}
    out, lse = poisoned_outputs(pd)
    pa.paged_attention(out, lse, *args_of(pd), *_extra(pd))
    _check(p, out.cpu(), lse.cpu(), name)


@pytest.mark.parametrize("cache", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_decode_splits_quantised(cache):
    """Forced split counts (partials carry the value scale; empty splits merge exactly)."""
    p = quantised_problem([1, 1], [150, 20], D=64, bs=16, Hkv=2, G=4, q_dtype=F16, cache=cache, scales="head",
                          sink=True, seed=5)
    a = args_of(p)
    for splits in (3, 16):
        out, lse = poisoned_outputs(p)
        pa.launch_decode(out, lse, *a[:8], a[8], a[9], a[10], a[11], a[12], num_splits=splits,
                         k_scale=p["k_scale"], v_scale=p["v_scale"])
        _check(p, out, lse, f"splits={splits}")


def test_capability_takes_the_cache_dtypes():
    """The Triton records of paged_attention and cache_write take float8 (with kv_scale) and float
    caches of any float dtype."""
    for cache in (E4M3, E5M2, BF16, F32, F16):
        call = Call("paged_attention", "cuda", BF16, 128, 16, 8, 2, cache, frozenset({"kv_scale"}))
        assert capability("paged_attention", "triton").rejects(call) is None, cache
        call = Call("cache_write", "cuda", F32, 128, 16, 0, 2, cache, frozenset({"kv_scale"}))
        assert capability("cache_write", "triton").rejects(call) is None, cache
    call = Call("paged_attention", "cuda", F32, 64, 16, 8, 2, BF16, frozenset())
    assert capability("paged_attention", "triton").rejects(call) is None
    call = Call("paged_attention", "cuda", BF16, 64, 16, 8, 2, torch.float64, frozenset())
    assert capability("paged_attention", "triton").rejects(call) is not None


def _tile_shapes():
    """Each distinct 16-bit (kernel, BLOCK_D, tile) a launcher or the tuner can pick, on any arch."""
    seen = {}
    for arch in cfgs.ARCHS:
        for bd in (64, 128, 256):
            for c in cfgs.prefill_configs(BF16, bd, arch):
                seen.setdefault(("prefill", bd, c.block_m, c.block_n), c)
            for rows in cfgs.decode_row_options(BF16, bd):
                for c in cfgs.decode_configs(BF16, bd, arch, rows):
                    seen.setdefault(("decode", bd, rows, c.block_n), c)
    return sorted(seen.items())


TILE_SHAPES = _tile_shapes()


@pytest.mark.parametrize("key,cfg", TILE_SHAPES, ids=[f"{k}-bd{b}-{m}x{n}" for (k, b, m, n), _ in TILE_SHAPES])
def test_every_tile_shape_quantised(key, cfg):
    """Every tile shape over a float8 cache (formats and scale kinds alternate), with window and
    causal edges (prefill) or forced splits (decode)."""
    kernel, bd, m, bn = key
    i = TILE_SHAPES.index((key, cfg))
    cache, scales = (E4M3, E5M2)[i % 2], ("0d", "head")[(i // 2) % 2]
    D = {64: 64, 128: 112, 256: 256}[bd]
    if kernel == "prefill":
        p = quantised_problem([m + 3, 2], [m + 40, 2], D=D, bs=8, Hkv=1, G=2, q_dtype=BF16, cache=cache, scales=scales,
                              window=bn + 5, seed=i)
        a = args_of(p)
        out, lse = poisoned_outputs(p)
        pa.launch_prefill(out, lse, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[8], a[9], a[10], a[11], a[12],
                          cfg=cfg, k_scale=p["k_scale"], v_scale=p["v_scale"])
    else:
        G, q_lens = (4, [1, 1]) if m == 16 else (12, [3, 1])
        p = quantised_problem(q_lens, [3 * bn + 5, 9], D=D, bs=16, Hkv=2, G=G, q_dtype=BF16, cache=cache, scales=scales,
                              sink=True, seed=i)
        assert cfgs.decode_rows(G * max(q_lens), BF16, bd) == m
        a = args_of(p)
        out, lse = poisoned_outputs(p)
        pa.launch_decode(out, lse, *a[:8], a[8], a[9], a[10], a[11], a[12], cfg=cfg, num_splits=2,
                         k_scale=p["k_scale"], v_scale=p["v_scale"])
    _check(p, out, lse, f"{key} {cfg}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantised_caches_gpu():
    """The same cases compiled on a GPU (real float8 bit operations, tensor-core dots)."""
    for case in WRITE_CASES:
        test_cache_write_bit_exact(case, dev="cuda")
    for case in ATTN_CASES:
        test_paged_attention_quantised(case, dev="cuda")
    torch.cuda.synchronize()
