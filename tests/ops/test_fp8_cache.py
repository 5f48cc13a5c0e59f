"""Quantised and mixed-dtype KV caches on the C++ CPU backend vs the specification.

* The encoding (``kvmem.ops._common.encode``: fp32 ``k / scale``, clamped to +- the format's
  largest finite value, rounded to nearest even) is bit-exact: every one of the 256 codes of
  both float8 formats, the midpoints between neighbouring codes (ties to even) and one fp32 ulp
  either side, subnormals, out-of-range values, +-inf, NaN and -0.0; also float caches with scales
  (clamped) and fp32 k written into bf16/fp16 caches.
* ``paged_attention`` over float8 caches (0-d and per-KV-head scales, both formats) against the
  reference given the same cache bytes: NaN bytes (0x7F) in every unused slot, shuffled pages,
  GQA, head dims, decode / prefill / mixed, window / softcap / sinks, RoPE on load. A covering
  subset of the product (each value of each axis with each format), not the full product.
* A float cache of another dtype than q (fp32 q over a bf16 / fp16 cache).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kvmem
from backends import on, run_and_compare
from cases import make_case
from kvmem.ops import reference
from kvmem.ops._common import encode
from tolerances import OUT, assert_close

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


# ---------------------------------------------------------------------------------------------
# the encoding, bit-exact
# ---------------------------------------------------------------------------------------------


def encoding_probe(dtype) -> torch.Tensor:
    """fp32 values that pin the encoding of ``dtype``: every code's value, the midpoints between
    neighbouring codes and one fp32 ulp either side, out-of-range values, inf, NaN, -0.0, tiny."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    finite = codes[torch.isfinite(codes)].unique()  # sorted, -0.0 and 0.0 merged
    mids = (finite[1:].double() + finite[:-1].double()) / 2  # exact in fp32 (one more bit)
    mids = mids.float()
    up = torch.nextafter(mids, torch.tensor(math.inf))
    down = torch.nextafter(mids, torch.tensor(-math.inf))
    big = torch.finfo(dtype).max
    extra = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, big * 1.01, -big * 1.01,
                          big * 1.0625, big * 1.2, 1e30, -1e30, 1e-30, -1e-30, 1e-45, 2.0**-20, -(2.0**-20)])
    return torch.cat([codes, mids, up, down, extra])


def _write(values: torch.Tensor, cache_dtype, scale: float, backend_op):
    """``values`` through cache_write (one key row per 8 values) with a 0-d scale; the cache bytes."""
    n = -(-values.numel() // 8) * 8
    vals = torch.cat([values, torch.zeros(n - values.numel())]).view(-1, 1, 8)
    k_cache = torch.zeros(vals.shape[0], 1, 1, 8, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(vals.shape[0])
    s = None if scale is None else torch.tensor(scale)
    backend_op(vals, -vals, k_cache, v_cache, slots, k_scale=s, v_scale=s)
    return k_cache, v_cache


@on("cpu")
@pytest.mark.parametrize("dtype", FP8 + [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_encoding_bit_exact(backend, dtype, scale):
    vals = encoding_probe(dtype if dtype in FP8 else torch.float8_e5m2) * scale
    if dtype not in FP8:  # float caches with scales clamp too: probe around their own max
        big = torch.finfo(dtype).max
        vals = torch.cat([vals, torch.tensor([big, big * 1.001, -big * 2, math.inf, -math.inf])])
    got_k, got_v = _write(vals, dtype, scale, kvmem.cache_write)
    ref_k, ref_v = _write(vals, dtype, scale, reference.cache_write)
    if dtype in FP8:  # one NaN code per sign: every byte pinned
        assert torch.equal(got_k.view(torch.uint8), ref_k.view(torch.uint8))
        assert torch.equal(got_v.view(torch.uint8), ref_v.view(torch.uint8))
    else:  # float caches: every bit except NaN payloads
        for got, ref in ((got_k, ref_k), (got_v, ref_v)):
            nan = ref.isnan()
            assert torch.equal(got.isnan(), nan)
            assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def test_encode_is_clamp_then_round_to_nearest_even():
    """The reference rule itself, against an independent integer model of e4m3 / e5m2 rounding."""
    for dtype, man, bias in ((torch.float8_e4m3fn, 3, 7), (torch.float8_e5m2, 2, 15)):
        x = encoding_probe(dtype)
        x = x[torch.isfinite(x)].double()
        big = torch.finfo(dtype).max
        a = x.abs().clamp(max=big)
        exp = torch.floor(torch.log2(a.clamp(min=2.0 ** (1 - bias))))  # subnormals share the min exponent
        step = torch.pow(2.0, exp - man)
        q = a / step
        r = torch.where((q - q.floor()) == 0.5, q.floor() + (q.floor() % 2), torch.round(q))  # ties to even
        want = (r * step).clamp(max=big) * torch.sign(x)
        got = encode(x.float(), dtype).double()
        same = (got == want) | ((got == 0) & (want == 0))
        assert bool(same.all()), (dtype, x[~same][:5], got[~same][:5], want[~same][:5])
    nan = encode(torch.tensor([math.nan, -math.inf, math.inf, -0.0]), torch.float8_e4m3fn).view(torch.uint8)
    assert nan.tolist() == [0x7F, 0xFE, 0x7E, 0x80]


def test_cache_write_fp32_into_bf16_cache_rounds_to_nearest_even():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(40, 2, 64, generator=g) * 3
    for dt in (torch.bfloat16, torch.float16):
        kc = torch.full((4, 16, 2, 64), math.nan, dtype=dt)
        vc, rk, rv = kc.clone(), kc.clone(), kc.clone()
        slots = torch.randperm(64, generator=g)[:40]
        kvmem.cache_write(k, -k, kc, vc, slots)
        reference.cache_write(k, -k, rk, rv, slots)
        assert torch.equal(kc.view(torch.int16), rk.view(torch.int16))
        assert torch.equal(vc.view(torch.int16), rv.view(torch.int16))


# ---------------------------------------------------------------------------------------------
# paged_attention over quantised caches
# ---------------------------------------------------------------------------------------------


def quantise_case(case, dtype, per_head: bool, seed: int):
    """``case`` with its caches encoded into ``dtype`` under fresh scales (NaN slots stay NaN bytes)."""
    g = torch.Generator().manual_seed(seed)
    hkv = case.k_cache.shape[2]
    big = torch.finfo(dtype).max
    amax = case.k_cache.float().nan_to_num(0).abs().amax()
    base = float(amax) * 1.3 / big
    k_scale = (torch.rand(hkv, generator=g) + 0.5) * base if per_head else torch.tensor(base)
    v_scale = (torch.rand(hkv, generator=g) + 0.5) * base if per_head else torch.tensor(base * 0.8)
    kq = encode(case.k_cache.float() / reference_scale(k_scale), dtype)
    vq = encode(case.v_cache.float() / reference_scale(v_scale), dtype)
    case.k_cache, case.v_cache = kq, vq
    case.kwargs = dict(case.kwargs, k_scale=k_scale.float(), v_scale=v_scale.float())
    return case


def reference_scale(s):
    return s.reshape(1, 1, -1, 1) if s.dim() == 1 else s


def rope_table(n: int, rot: int):
    angles = torch.arange(n + 1.0)[:, None] / 10000.0 ** (torch.arange(0, rot, 2.0) / rot)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


# A covering subset: every (format, scale kind, rope) combination, the other axes rotated through.
QDTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # (q_lens, kv_lens)
    ([1, 1, 1], [37, 130, 9]),   # decode
    ([23, 1], [23, 70]),         # prefill + decode (mixed)
    ([5, 0, 12], [40, 17, 12]),  # short prefill chunks, an idle sequence
    ([1, 1], [600, 1]),          # long decode: split-K
]
HEADS = [(4, 2), (6, 2), (8, 1), (7, 7), (8, 8), (12, 4)]  # groups 2, 3, 8, 1, 1, 3
HEAD_DIMS = [64, 128, 80, 256]
PAGES = [16, 1, 32, 8]
EXTRAS = [{}, {"window": 24}, {"softcap": 20.0}, {"sink": True}]
COVER = []
for i, (fmt, per_head, rope) in enumerate(itertools.product(FP8, (False, True), (False, True))):
    for j in range(3):
        n = 3 * i + j
        COVER.append((fmt, per_head, rope, QDTYPES[n % 3], SHAPES[n % 4], HEADS[n % 6], HEAD_DIMS[(n // 2) % 4],
                      PAGES[(n // 3) % 4], EXTRAS[(n + i) % 4], n))


def _id(c):
    fmt, per_head, rope, qdt, shape, heads, d, bs, extra, n = c
    return (f"{str(fmt)[-6:]}-{'perhead' if per_head else 'scalar'}-{'rope' if rope else 'norope'}-"
            f"{str(qdt)[6:]}-q{len(shape[0])}-h{heads[0]}x{heads[1]}-d{d}-bs{bs}-{'-'.join(extra) or 'plain'}")


@on("cpu")
@pytest.mark.parametrize("cfg", COVER, ids=[_id(c) for c in COVER])
def test_paged_attention_fp8(backend, cfg):
    fmt, per_head, rope, qdt, (q_lens, kv_lens), (hq, hkv), d, bs, extra, n = cfg
    case = make_case(q_lens, kv_lens, num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=qdt,
                     strided=n % 5 == 0, seed=100 + n, **extra)
    case = quantise_case(case, fmt, per_head, seed=n)
    if rope:
        rot = d if n % 2 else d // 2  # partial rotary too
        case.kwargs = dict(case.kwargs, rope_cos_sin=rope_table(max(kv_lens), rot), rope_neox=n % 4 != 1)
    assert int((case.k_cache.view(torch.uint8) == 0x7F).sum()) > 0  # NaN bytes in unused slots
    run_and_compare(case, label=f"cfg {n}")


@on("cpu")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1], [33, 300]), ([20, 3], [20, 40])])
def test_paged_attention_float_cache_of_another_dtype(backend, cache_dtype, q_lens, kv_lens):
    """fp32 q over a bf16 / fp16 cache (e.g. bf16 KV under an fp32 model), without scales."""
    case = make_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, head_dim=64, dtype=torch.float32, seed=7)
    case.k_cache, case.v_cache = case.k_cache.to(cache_dtype), case.v_cache.to(cache_dtype)
    run_and_compare(case)


@on("cpu")
def test_paged_attention_scaled_float_cache(backend):
    """A bf16 cache with per-head scales (not fp8): dequantised on load like the fp8 ones."""
    case = make_case([1, 9], [50, 9], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, seed=9)
    case = quantise_case(case, torch.bfloat16, True, seed=1)
    run_and_compare(case)


@on("cpu")
def test_fp8_roundtrip_through_cache_write_and_attention(backend):
    """cache_write (kernel) then paged_attention (kernel) equals the reference pair, and the fp8
    result stays near the unquantised fp32 attention (tolerances.FP8_E4M3)."""
    from tolerances import FP8_E4M3

    g = torch.Generator().manual_seed(5)
    hkv, d, bs, n = 2, 64, 16, 50
    k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    sc = torch.tensor([k[:, 0].abs().max(), k[:, 1].abs().max()]) * 1.25 / 448.0
    caches = {}
    for name, dt in (("fp32", torch.float32), ("fp8", torch.float8_e4m3fn)):
        kc = torch.full((5, bs, hkv, d), math.nan).to(dt)
        vc = kc.clone()
        table = torch.tensor([[3, 0, 4, 1]], dtype=torch.int32)
        slots = torch.tensor([int(table[0, t // bs]) * bs + t % bs for t in range(n)])
        kw = dict(k_scale=sc, v_scale=sc) if dt != torch.float32 else {}
        kvmem.cache_write(k, v, kc, vc, slots, **kw)
        caches[name] = (kc, vc, kw)
    q = torch.randn(1, 4, d, generator=g)
    meta = (torch.tensor([[3, 0, 4, 1]], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32), 1, n)
    outs = {}
    for name, (kc, vc, kw) in caches.items():
        outs[name] = kvmem.paged_attention(q, kc, vc, *meta, **kw)
        ref = reference.paged_attention(q, kc, vc, *meta, scale=d**-0.5, **kw)[0]
        assert_close(outs[name], ref, **OUT[torch.float32])
    torch.testing.assert_close(outs["fp8"], outs["fp32"], **FP8_E4M3)


@on("cpu")
@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("group", [8, 256])  # decode: decoded inside the micro-kernels; many rows: into the scratch
def test_paged_attention_decodes_every_code_exactly(backend, fmt, group):
    """One key per sequence, so the output is exactly the decoded value row times v_scale and the
    lse exactly scale * decoded key times k_scale: every one of the 256 codes (NaN codes give NaN)."""
    d = 256
    hkv = 256 // group
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    k_cache = torch.zeros(2, 1, hkv, d, dtype=torch.uint8)
    v_cache = torch.zeros(2, 1, hkv, d, dtype=torch.uint8)
    finite_code = torch.isfinite(codes.view(fmt).float())
    key_codes = torch.where(finite_code, codes, torch.zeros_like(codes))  # 0 * inf/NaN would poison every score
    for h in range(hkv):
        k_cache[1, 0, h] = key_codes
        v_cache[1, 0, h] = codes.roll(37 * h)  # every code, NaN and inf ones included
    k_cache, v_cache = k_cache.view(fmt), v_cache.view(fmt)
    q = torch.zeros(1, 256, d)
    for h in range(256):  # query head h one-hot on channel h: its score reads key code h
        q[0, h, h] = 1.0
    ks, vs = torch.full((hkv,), 0.5), torch.full((hkv,), 0.25)
    meta = (torch.tensor([[1]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32), 1, 1)
    out, lse = kvmem.paged_attention(q, k_cache, v_cache, *meta, scale=1.0, k_scale=ks, v_scale=vs, return_lse=True)
    ref, ref_lse = reference.paged_attention(q, k_cache, v_cache, *meta, scale=1.0, k_scale=ks, v_scale=vs)
    assert int(ref.isnan().sum()) > 0  # the NaN codes are in there
    torch.testing.assert_close(out, ref, atol=0, rtol=0, equal_nan=True)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=0, rtol=0)
