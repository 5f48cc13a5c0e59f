"""Shared-prefix (cascade) decode inside ``generate()``: chosen automatically when the rows of a
decode step share leading pages (``prefix_cache=True`` hands every row the cached blocks of a
shared prompt prefix), and the same output as plain decode (``KVMEM_CASCADE=0``) and unpatched HF.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvmem.integrations import patch, unpatch  # noqa: E402
from kvmem.integrations.hf import cascade as hf_cascade  # noqa: E402
from kvmem.ops import cascade  # noqa: E402
from test_hf import PROMPTS, assert_same_generation, gen, left_pad, smol, tiny_llama, tiny_qwen2_sliding  # noqa: E402,F401

transformers.logging.set_verbosity_error()


@pytest.fixture
def runs(monkeypatch):
    """Counts the cascade runs (rows, shared pages) while a test runs."""
    seen = []
    orig = cascade.run

    def spy(pa, merge, q, k_cache, v_cache, plan, **kw):
        seen.append((plan.rows, plan.num_shared_blocks))
        return orig(pa, merge, q, k_cache, v_cache, plan, **kw)

    monkeypatch.setattr(cascade, "run", spy)
    return seen


def chain_calls(model, prompts, *, block_size, new_tokens=8, backend="auto"):
    """A first call caches the shared prefix; the second, batched, starts every row from it."""
    patch(model, block_size=block_size, prefix_cache=True, num_blocks=600, backend=backend)
    try:
        gen(model, input_ids=torch.tensor([prompts[0]]), max_new_tokens=2)
        ids, mask = left_pad(prompts)
        return gen(model, input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens)
    finally:
        unpatch(model)


def prompts_sharing(prefix_len, suffixes, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, 128, (prefix_len,), generator=g).tolist()
    return [shared + torch.randint(1, 128, (n,), generator=g).tolist() for n in suffixes]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_generate_batch_over_cached_prefix(monkeypatch, runs, backend):
    """Batch of 4 over a 150-token cached prefix (GQA 4, d=32): cascade runs, and greedy tokens and
    logits match plain decode and unpatched HF (fp32, 1e-4)."""
    m = tiny_llama(layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32, hidden_size=128)
    prompts = prompts_sharing(150, [5, 11, 3, 8])
    monkeypatch.setenv("KVMEM_CASCADE", "auto")
    out = chain_calls(m, prompts, block_size=16, backend=backend)
    assert runs, "cascade decode did not run"
    assert {r for r, _ in runs} == {4} and min(p for _, p in runs) >= 8  # >= 128 of the 150 prefix tokens
    runs.clear()
    monkeypatch.setenv("KVMEM_CASCADE", "0")
    plain = chain_calls(m, prompts, block_size=16, backend=backend)
    assert not runs
    assert_same_generation(out, plain)
    ids, mask = left_pad(prompts)
    assert_same_generation(out, gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=8))  # unpatched


def test_generate_sliding_model_cascades_full_group_only(monkeypatch, runs):
    """Full + sliding layer groups: cascade in the full group, plain decode in the sliding one.
    (With a sliding group, prefix reuse across calls starts today from few blocks — here one — so
    ``KVMEM_CASCADE=1`` makes the step cascade with any shared page.)"""
    m = tiny_qwen2_sliding(layers=4, window=16)
    prompts = prompts_sharing(90, [4, 7, 2])
    monkeypatch.setenv("KVMEM_CASCADE", "1")
    out = chain_calls(m, prompts, block_size=8, new_tokens=6)
    assert len(runs) == 5 * 2  # 5 decode steps x the 2 full-attention layers
    ids, mask = left_pad(prompts)
    assert_same_generation(out, gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=6))


def test_generate_rows_without_shared_prefix_stay_plain(monkeypatch, runs):
    m = tiny_llama(layers=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(3)]
    monkeypatch.setenv("KVMEM_CASCADE", "auto")
    out = chain_calls(m, prompts, block_size=8, new_tokens=4)
    assert not runs
    ids, mask = left_pad(prompts)
    assert_same_generation(out, gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=4))


def test_threshold_rule(monkeypatch):
    rule = hf_cascade.worth_it
    assert rule(2, 4, 16, 128, "auto")  # 32 of 128 tokens: 25 %
    assert not rule(2, 4, 16, 129, "auto")  # just under 25 %
    assert not rule(1, 4, 16, 32, "auto")  # one page: below MIN_SHARED_BLOCKS
    assert not rule(8, 1, 16, 128, "auto")  # one row: nothing to share
    assert rule(1, 2, 16, 10_000, "on") and not rule(8, 4, 16, 128, "off")
    monkeypatch.setenv("KVMEM_CASCADE", "maybe")
    with pytest.raises(ValueError, match="KVMEM_CASCADE must be one of auto"):
        hf_cascade.mode()


def test_generate_beam_search(monkeypatch, runs):
    """Beams expanded from one prompt share its pages: cascade decode, the same beams as unpatched."""
    m = tiny_llama(layers=2)
    prompt = prompts_sharing(60, [3])[0]
    kw = dict(input_ids=torch.tensor([prompt]), max_new_tokens=6, num_beams=3, output_logits=False)
    monkeypatch.setenv("KVMEM_CASCADE", "auto")
    patch(m, block_size=8)
    try:
        out = gen(m, **kw)
    finally:
        unpatch(m)
    ref = gen(m, **kw)
    assert runs and {r for r, _ in runs} == {3}
    assert torch.equal(out.sequences, ref.sequences)


def test_smollm2_batch_over_cached_system_prompt(monkeypatch, runs, smol):
    """SmolLM2-135M (real weights, fp32): a long system prompt cached by a first call, then 4
    questions over it in one batch: cascade decode, identical tokens and logits within 1e-4 vs
    plain decode and unpatched HF."""
    system = (PROMPTS[0][:-6] + PROMPTS[2][24:-6]) * 4  # ~150 tokens of chat text, the shared part
    questions = [p[24:] for p in PROMPTS]
    prompts = [system + q for q in questions]
    monkeypatch.setenv("KVMEM_CASCADE", "auto")
    out = chain_calls(smol, prompts, block_size=16, new_tokens=10)
    assert runs and {r for r, _ in runs} == {4}
    runs.clear()
    monkeypatch.setenv("KVMEM_CASCADE", "0")
    plain = chain_calls(smol, prompts, block_size=16, new_tokens=10)
    assert not runs
    assert_same_generation(out, plain)
    ids, mask = left_pad(prompts)
    assert_same_generation(out, gen(smol, input_ids=ids, attention_mask=mask, max_new_tokens=10))


def test_patch_cascade_option_overrides_the_environment(monkeypatch, runs):
    """``kvmem.patch(cascade=...)``: False never cascades, True always (whatever ``KVMEM_CASCADE``
    says); a bad value is a ValueError naming ``cascade``, the model left unpatched. The batch here
    is a first call (nothing cached): the one-row pre-pass computes its shared prefix once and
    every row starts from the same pages, so decode cascades without a priming call."""
    m = tiny_llama(layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32, hidden_size=128)
    prompts = prompts_sharing(70, [5, 9, 2])
    ids, mask = left_pad(prompts)
    want = gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=5)
    for how, env, cascades in ((False, "1", False), (True, "0", True), ("auto", "0", True), (None, "0", False)):
        monkeypatch.setenv("KVMEM_CASCADE", env)
        runs.clear()
        patch(m, block_size=8, prefix_cache=True, cascade=how)
        try:
            out = gen(m, input_ids=ids, attention_mask=mask, max_new_tokens=5)
            assert m._kvmem_prefix_report.prepass_tokens == 64
        finally:
            unpatch(m)
        assert bool(runs) == cascades, (how, env)
        if cascades:
            assert {r for r, _ in runs} == {3} and min(p for _, p in runs) >= 7
        assert_same_generation(out, want)
    for bad in ("sometimes", 1, ""):
        with pytest.raises(ValueError, match="cascade must be None"):
            patch(m, cascade=bad)
        assert not hasattr(m, "_kvmem_options") or m._kvmem_options is None
