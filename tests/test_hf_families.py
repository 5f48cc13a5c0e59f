"""Every row of kvmem.integrations.families on a small random-weight model (fp32): prefill + 40
decode steps with logits within 1e-4 of the unpatched model, prompts longer than the sliding
windows, a left-padded batch, and the generic path and rejections."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvmem.integrations import PagedKVCache, UnsupportedModelError, families, patch, unpatch  # noqa: E402
from kvmem.integrations.hf.compat import output_cache  # noqa: E402
from test_hf import generate_patched, memory_bound_ok  # noqa: E402

transformers.logging.set_verbosity_error()
LOGIT_RTOL = 1e-4
WINDOW = 24
PROMPT = 50  # > WINDOW
DECODE = 40

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, eos_token_id=None,
              bos_token_id=None)

# family name -> (config class, model class, extra config, reference attn_implementation or None)
BUILD = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW), None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2), None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2), None),
    # softcap 1.0 so that it matters for small random logits; eager applies it on every version
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=30.0,
                    query_pre_attn_scalar=16), "eager"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=WINDOW, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"] * 2), None),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW), None),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2), None),
}


def build(name, seed=0, **over):
    cfg_cls, model_cls, extra, ref_attn = BUILD[name]
    kw = dict(COMMON)
    kw.update(extra)
    kw.update(over)
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "sinks"):  # gpt-oss: make the sink logits matter
                m.sinks.normal_(0.0, 1.0)
            if getattr(m, "attn_logit_softcapping", None) and hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(20.0)  # gemma2: scores of O(1..10), so that the softcap matters
    if ref_attn is not None:
        model.set_attn_implementation(ref_attn)
    return model


def gen(model, **kw):
    return model.generate(do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check(out, ref, rows=None):
    rows = slice(None) if rows is None else rows
    assert torch.equal(out.sequences[rows], ref.sequences[rows])
    errs = [rel_err(a[rows], b[rows]) for a, b in zip(out.logits, ref.logits)]
    assert max(errs) <= LOGIT_RTOL, f"max rel logit err {max(errs):.2e} at step {errs.index(max(errs))}"


def test_table_covers_the_built_models():
    assert [f.name for f in families.FAMILIES] == list(BUILD)


@pytest.mark.parametrize("name", list(BUILD))
def test_family_prefill_and_decode_match_unpatched(name):
    model = build(name)
    fam = families.resolve(model.config, model)
    assert fam is not None and fam.name == name
    ids = torch.randint(1, 128, (1, PROMPT))
    g = dict(input_ids=ids, max_new_tokens=DECODE + 1, min_new_tokens=DECODE + 1)  # prefill + 40 decode steps
    ref = gen(model, **g)
    ref_attn = model.config._attn_implementation
    patch(model, block_size=8)
    try:
        out = gen(model, **g)
    finally:
        unpatch(model)
    assert model.config._attn_implementation == ref_attn
    cache = output_cache(out)
    assert isinstance(cache, PagedKVCache)
    check(out, ref)
    assert memory_bound_ok(cache)  # every group, the alternating-window ones (gemma2/3, gpt_oss) included
    windows = families.layer_windows(model.config)
    expect_groups = {("full" if w is None else f"sliding_{w}") for w in windows}
    assert set(cache.group_names) == expect_groups
    if "window" in fam.features:
        assert f"sliding_{WINDOW}" in expect_groups
        u = cache.usage()[f"sliding_{WINDOW}"]
        assert u.blocks_used <= WINDOW // 8 + 1 < -(-(PROMPT + DECODE) // 8)  # left-window pages freed
    if "alternating" in fam.features:
        assert expect_groups == {"full", f"sliding_{WINDOW}"}


@pytest.mark.parametrize("name", list(BUILD))
def test_family_static_decode_compiles_fullgraph(name):
    """generate() with the decode step compiled by torch.compile(fullgraph=True) (static metadata,
    kvmem.patch(compile_decode=...)): one graph for every family (softcap, sinks, alternating
    windows, q/k norms), tokens and logits as unpatched, prompt longer than the window."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = build(name)
    ids = torch.randint(1, 128, (1, 30))
    g = dict(input_ids=ids, max_new_tokens=12, min_new_tokens=12)
    ref = gen(model, **g)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    (out,), stats = generate_patched(model, g, generate=gen, block_size=8, compile_decode=dict(backend=counter))
    check(out, ref)
    assert stats["compiled"] == 11 and counter.frame_count == 1, (stats, counter.frame_count)
    assert memory_bound_ok(output_cache(out))


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gpt_oss"])
def test_family_left_padded_batch_matches_unpatched_batch(name):
    model = build(name, seed=1)
    lens = (PROMPT, 9, 33)
    S = max(lens)
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for i, L in enumerate(lens):
        ids[i, S - L:] = torch.randint(1, 128, (L,))
        mask[i, S - L:] = 1
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20)
    ref = gen(model, **g)
    patch(model, block_size=8)
    try:
        out = gen(model, **g)
    finally:
        unpatch(model)
    check(out, ref)
    assert output_cache(out).row_lengths() == [L + 19 for L in lens]


def test_generic_path_for_an_unlisted_family():
    """A decoder on HF's attention interface that is not in the table (Granite: custom scaling
    multipliers) takes the generic path."""
    cfg = transformers.GraniteConfig(**dict(COMMON, attention_multiplier=0.3, residual_multiplier=0.5,
                                            embedding_multiplier=2.0, logits_scaling=4.0))
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM(cfg).eval()
    assert families.resolve(model.config, model) is None  # generic
    ids = torch.randint(1, 128, (1, 30))
    g = dict(input_ids=ids, max_new_tokens=20, min_new_tokens=20)
    ref = gen(model, **g)
    patch(model)
    try:
        out = gen(model, **g)
    finally:
        unpatch(model)
    check(out, ref)


def test_unsupported_feature_errors_name_feature_and_supported_list():
    cases = [
        (transformers.T5Config(), "encoder-decoder"),
        (transformers.Llama4TextConfig(attention_chunk_size=32), "chunked attention"),
        (transformers.Gemma3TextConfig(use_bidirectional_attention=True), "bidirectional"),
    ]
    for cfg, what in cases:
        with pytest.raises(UnsupportedModelError) as e:
            families.resolve(cfg)
        msg = str(e.value)
        assert what in msg and all(f.name in msg for f in families.FAMILIES), msg
    # a model whose attention does not go through HF's AttentionInterface
    model = build("llama")
    type(model)._can_set_attn_implementation_cached_value = False
    try:
        with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
            patch(model)
    finally:
        del type(model)._can_set_attn_implementation_cached_value


def test_group_layers_and_windows():
    cfg = build("gemma3").config
    assert families.layer_windows(cfg) == [WINDOW, None, WINDOW, None]
    assert families.group_layers(families.layer_windows(cfg)) == [("full", (1, 3), None),
                                                                  (f"sliding_{WINDOW}", (0, 2), WINDOW)]
    assert families.layer_windows(build("mistral").config) == [WINDOW] * 4
    assert families.layer_windows(build("llama").config) == [None] * 4
    assert families.kv_dims(cfg) == (4, 2, 16)
