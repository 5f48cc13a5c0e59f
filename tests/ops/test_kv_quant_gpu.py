"""Quantised and other-dtype KV caches on a real GPU: the CUDA ``cache_write`` and
``paged_attention`` vs the reference (tests marked ``gpu``; compile-checked only until a GPU run).

* ``cache_write``: bit-exact against the reference (kvmem's one encoding, ``kvmem.ops._common.
  encode``) into float8 e4m3fn / e5m2 caches with 0-d and per-KV-head scales, over every code's
  value, the midpoints between codes, out-of-range values, +-inf and NaN; float caches with scales
  and caches of another float dtype than k; 16-byte and element-wise paths; skipped slots untouched.
* ``paged_attention`` (decode kernel): every float8 code dequantised exactly (one key per
  sequence: out = decode(code) * v_scale, compared bit for bit), then decode / speculative steps
  against the reference with float8 caches, 16-bit caches of the other 16-bit dtype (with and
  without scales) and caches of q's dtype with scales: NaN in unused slots, shuffled pages,
  GQA groups 1, 4, 12 (12: the chunk path), all built head dims, 0-d and per-head scales, RoPE on load
  (NeoX and GPT-J, partial rotary) with and without float8, window / softcap / sinks.

Passing configurations are recorded with their ``cache_dtype`` / ``kv_scale`` (kvmem/verified:
such a call is verified only by an entry naming them).
"""

import math

import pytest
import torch

import kvmem
from backends import PASSED, on
from cases import make_case, to_device
from kvmem import _ext
from kvmem.ops import reference
from kvmem.ops._common import encode
from tolerances import assert_close

FP8 = {n: getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
Q_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
OTHER_HALF = {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cuda_takes(op, cache_dtype) -> bool:
    facts = _ext.kernel_facts(op, "cuda")
    return facts is None or _name(cache_dtype) in facts.get("cache_dtypes", ())  # None: fail loudly below


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The storage bits of ``t`` (uint8 for float8, int16/int32 for the float types), on the CPU."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.cpu().contiguous().view(view)


def _assert_same_cache(got: torch.Tensor, want: torch.Tensor, what: str):
    """float8: the same bits everywhere; float caches: the same bits except NaN payloads."""
    if got.dtype in FP8.values():
        same = _bits(got) == _bits(want)
    else:
        g, w = got.cpu().float(), want.cpu().float()
        same = (_bits(got) == _bits(want)) | (g.isnan() & w.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ, first at {(~same).nonzero()[:4].tolist()}"


def _special_values(dtype, n, g) -> torch.Tensor:
    """[n] fp32: every finite code's value of ``dtype`` (float8), midpoints between neighbours,
    out-of-range values, +-inf, NaN, -0.0, and random normals at several magnitudes."""
    parts = []
    if dtype in FP8.values():
        codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        finite = codes[codes.isfinite()].unique()
        parts += [finite, (finite[1:] + finite[:-1]) / 2, finite * 1.0001, finite * 0.9999]
    big = torch.finfo(dtype).max
    parts += [torch.tensor([big * 1.5, -big * 1.5, big * 4, math.inf, -math.inf, math.nan, -0.0, 0.0])]
    parts += [torch.randn(256, generator=g) * s for s in (1e-3, 1.0, 30.0, 1e4)]
    vals = torch.cat(parts)
    return vals[torch.randint(0, vals.numel(), (n,), generator=g)]


def _cache_write_case(k_dtype, cache_dtype, head_dim, scales, seed):
    """The projection [20, 8, head_dim] whose heads 0-2 are k and 3-5 v, caches full of NaN,
    slot_mapping with skips, and the scales (None, 0-d or [3])."""
    g = torch.Generator().manual_seed(seed)
    num_tokens, hkv, blocks, bs = 20, 3, 5, 16
    vals = _special_values(cache_dtype, num_tokens * 8 * head_dim, g).view(num_tokens, 8, head_dim)
    packed = vals.to(k_dtype)
    if cache_dtype in FP8.values():
        k_cache = torch.full((blocks, bs, hkv, head_dim), 0x7F, dtype=torch.uint8).view(cache_dtype)
    else:
        k_cache = torch.full((blocks, bs, hkv, head_dim), math.nan, dtype=cache_dtype)
    v_cache = k_cache.clone()
    slots = torch.randperm(blocks * bs, generator=g)[:num_tokens]
    slots[::5] = -1
    if scales == "none":
        k_scale = v_scale = None
    elif scales == "tensor":
        k_scale, v_scale = torch.tensor(0.75), torch.tensor(2.0)
    else:  # per KV head, one of them a power of two (values land exactly on codes)
        k_scale = torch.tensor([0.5, 1.3, 7.0])
        v_scale = torch.tensor([1.0, 0.01, 300.0])
    return packed, k_cache, v_cache, slots, k_scale, v_scale


CACHE_WRITE_CASES = (
    [(kd, cd, sc) for cd in FP8 for kd in ("float32", "bfloat16", "float16") for sc in ("tensor", "per_head")]
    + [(kd, cd, "per_head") for kd in ("float32", "bfloat16") for cd in ("float32", "bfloat16", "float16")]
    + [(kd, cd, "none") for kd, cd in (("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "float16"),
                                       ("float16", "float32"), ("bfloat16", "float32"))])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256, 36])  # 36: not 16-byte rows, the element-wise path
@pytest.mark.parametrize("k_name,cache_name,scales", CACHE_WRITE_CASES)
@on("cuda")
def test_cache_write_quantised_bit_exact_gpu(backend, k_name, cache_name, scales, head_dim):
    k_dtype, cache_dtype = getattr(torch, k_name), getattr(torch, cache_name)
    if not _cuda_takes("cache_write", cache_dtype):
        pytest.skip(f"the CUDA cache_write of this build takes no {cache_name} cache")
    packed, k_cache, v_cache, slots, k_scale, v_scale = _cache_write_case(k_dtype, cache_dtype, head_dim, scales,
                                                                          seed=head_dim + len(k_name + cache_name))
    hkv = k_cache.shape[2]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.cache_write(packed[:, :hkv], packed[:, hkv:2 * hkv], ref_k, ref_v, slots, k_scale, v_scale)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    packed_d = packed.cuda()  # k, v stay strided slices of the projection on the GPU
    kc, vc = k_cache.cuda(), v_cache.cuda()
    kvmem.cache_write(packed_d[:, :hkv], packed_d[:, hkv:2 * hkv], kc, vc, slots.cuda(), k_scale=dev(k_scale),
                      v_scale=dev(v_scale))
    _assert_same_cache(kc, ref_k, f"k_cache ({k_name} -> {cache_name}, {scales}, D={head_dim})")
    _assert_same_cache(vc, ref_v, f"v_cache ({k_name} -> {cache_name}, {scales}, D={head_dim})")
    if head_dim != 36 and scales != "tensor":
        entry = {"op": "cache_write", "dtype": k_name, "head_dim": head_dim, "block_size": 0}
        if cache_name != k_name:
            entry["cache_dtype"] = cache_name
        if scales != "none":
            entry["kv_scale"] = True
        PASSED.setdefault(backend, []).append(entry)


@pytest.mark.gpu
@pytest.mark.parametrize("q_name", list(Q_DTYPES))
@pytest.mark.parametrize("cache_name", list(FP8))
@on("cuda")
def test_every_fp8_code_dequantised_exactly_gpu(backend, cache_name, q_name):
    """One key per sequence, so out = v exactly: decode(code) * v_scale (a power of two) for all
    256 codes (NaN codes give NaN), bit for bit against the reference."""
    cache_dtype, q_dtype = FP8[cache_name], Q_DTYPES[q_name]
    if not _cuda_takes("paged_attention", cache_dtype):
        pytest.skip(f"the CUDA paged_attention of this build takes no {cache_name} cache")
    head_dim = 128
    codes = torch.arange(256, dtype=torch.uint8).view(2, 1, 1, head_dim)  # 2 blocks of 1 slot, 1 head
    v_cache = codes.view(cache_dtype)
    k_cache = torch.zeros(2, 1, 1, head_dim, dtype=torch.uint8).view(cache_dtype)
    q = torch.randn(2, 3, head_dim).to(q_dtype)
    table = torch.tensor([[1], [0]], dtype=torch.int32)
    seq_lens = torch.tensor([1, 1], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    kw = dict(scale=0.1, k_scale=torch.tensor(1.0), v_scale=torch.tensor(0.5))
    ref, _ = reference.paged_attention(q, k_cache, v_cache, table, seq_lens, cu, 1, 1, **kw)
    args = [t.cuda() for t in (q, k_cache, v_cache, table, seq_lens, cu)]
    got = kvmem.paged_attention(*args, 1, 1, **{k: (x.cuda() if torch.is_tensor(x) else x) for k, x in kw.items()})
    _assert_same_cache(got, ref, f"out ({cache_name}, q {q_name})")


def _quantised(case, cache_dtype, scales, g):
    """The case with its caches encoded into ``cache_dtype`` (kvmem's encoding; NaN slots stay NaN),
    strided layouts kept, and the scales it was encoded with ({} for a float cache without)."""
    hkv = case.k_cache.shape[2]
    if scales == "tensor":
        k_scale, v_scale = torch.tensor(0.05), torch.tensor(0.03)
    elif scales == "per_head":
        k_scale = torch.rand(hkv, generator=g) * 0.05 + 0.01
        v_scale = torch.rand(hkv, generator=g) * 0.05 + 0.01
    else:
        k_scale = v_scale = None
    out = []
    for cache, s in ((case.k_cache, k_scale), (case.v_cache, v_scale)):
        x = cache.float() if s is None else cache.float() / (s.view(1, 1, -1, 1) if s.dim() else s)
        enc = encode(x, cache_dtype) if s is not None else x.to(cache_dtype)
        if cache.is_contiguous():
            out.append(enc)
        else:  # keep the interleaved pool's strides
            n = cache.untyped_storage().nbytes() // cache.element_size()
            flat = torch.full((n,), math.nan).to(cache_dtype)
            view = flat.as_strided(cache.size(), cache.stride(), cache.storage_offset())
            view.copy_(enc)
            out.append(view)
    case.k_cache, case.v_cache = out
    if k_scale is not None:
        case.kwargs.update(k_scale=k_scale, v_scale=v_scale)
    return case


def _rope(case, rot_dim, neox):
    inv = 1.0 / 10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = torch.arange(case.max_seqlen_k, dtype=torch.float64)[:, None] * inv[None]
    case.kwargs.update(rope_cos_sin=torch.cat([ang.cos(), ang.sin()], dim=-1).float(), rope_neox=neox)
    return case


DECODE_STEPS = (([1, 1, 1, 1], [1, 9, 33, 70]), ([2, 5, 1], [9, 40, 300]), ([1, 1], [1100, 300]))  # last: splits
# (head dim, page size): every built head dim, page sizes 1, 16, 64 (the decode kernel's K/V load
# does not depend on the page size: a subset keeps this within the GPU check's time)
SHAPES = ((64, 16), (80, 1), (96, 64), (112, 16), (128, 16), (128, 1), (256, 64))
EXTRAS = (dict(), dict(window=50), dict(softcap=20.0), dict(sink=True))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,block_size", SHAPES)
@pytest.mark.parametrize("q_name", list(Q_DTYPES))
@pytest.mark.parametrize("cache_name", list(FP8) + ["other_half", "same"])  # same: q's dtype with scales
@on("cuda")
def test_paged_attention_quantised_cache_gpu(backend, cache_name, q_name, head_dim, block_size):
    q_dtype = Q_DTYPES[q_name]
    cache_dtype = {"other_half": OTHER_HALF[q_dtype], "same": q_dtype}.get(cache_name) or FP8[cache_name]
    if not _cuda_takes("paged_attention", cache_dtype):
        pytest.skip(f"the CUDA paged_attention of this build takes no {_name(cache_dtype)} cache")
    g = torch.Generator().manual_seed(head_dim * 7 + block_size)
    seed = 0
    for group in (1, 4, 12):  # 12: two chunks of 8 query heads
        hkv = 2 if group < 8 else 1
        for si, (q_lens, kv_lens) in enumerate(DECODE_STEPS):
            seed += 1
            extra = EXTRAS[(seed + head_dim) % len(EXTRAS)]
            case = make_case(q_lens, kv_lens, num_heads=group * hkv, num_kv_heads=hkv, head_dim=head_dim,
                             block_size=block_size, dtype=q_dtype, strided=seed % 2 == 0, seed=seed, **extra)
            scales = ("tensor", "per_head", "none")[seed % 3] if cache_name == "other_half" else \
                ("tensor", "per_head")[seed % 2]
            case = _quantised(case, cache_dtype, scales, g)
            if seed % 3 == 0:  # RoPE on load, partial rotary every other time, both layouts
                case = _rope(case, head_dim if seed % 2 else head_dim // 2, neox=seed % 4 != 0)
            ref, ref_lse = case.reference()
            dcase = to_device(case, "cuda")
            out = torch.full_like(dcase.q, math.nan)
            got, lse = kvmem.paged_attention(*dcase.args(), **dcase.kwargs, out=out, return_lse=True)
            what = f"out ({_name(cache_dtype)} cache, {scales} scales: {case.describe()})"
            assert_close(got.cpu(), ref, what=what)
            assert_close(lse.cpu(), ref_lse, what="lse")
    entry = {"op": "paged_attention", "dtype": q_name, "head_dim": head_dim, "block_size": block_size,
             "max_group": 12, "cache_dtype": _name(cache_dtype), "kv_scale": True}
    if cache_name == "same":
        del entry["cache_dtype"]
    PASSED.setdefault(backend, []).append(entry)
    if cache_name == "other_half":
        PASSED[backend].append({k: x for k, x in entry.items() if k != "kv_scale"})  # without scales too
