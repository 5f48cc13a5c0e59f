"""``kvmem.model_fingerprint``: equal for the same model, different for one changed weight, and prefix
blocks are never reused across models."""

import pytest
import torch

import kvmem
from kvmem.cache import KVCacheManager, LayerGroupSpec

transformers = pytest.importorskip("transformers")

from kvmem.integrations.hf.compat import output_cache  # noqa: E402
from kvmem.integrations.hf.fingerprint import model_fingerprint  # noqa: E402


def tiny(seed=0, **kw):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0,
               eos_token_id=None, bos_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def test_same_model_same_fingerprint():
    a, b = tiny(), tiny()
    fa = model_fingerprint(a)
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert fa == model_fingerprint(a) == model_fingerprint(b) == kvmem.model_fingerprint(b)
    a.config._attn_implementation = "eager"  # volatile config fields do not count
    assert model_fingerprint(a) == fa


def test_one_changed_weight_changes_the_fingerprint():
    a, b = tiny(), tiny()
    fa = model_fingerprint(a)
    with torch.no_grad():
        b.model.layers[1].self_attn.k_proj.weight[3, 5] += 1e-3  # in place: the version counter moves
    assert model_fingerprint(b) != fa
    with torch.no_grad():
        b.model.layers[1].self_attn.k_proj.weight[3, 5] -= 1e-3
    b.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(b.model.layers[0].mlp.up_proj.weight * 1.0001)
    assert model_fingerprint(b) != fa  # a replaced tensor


def test_adapter_and_dtype_and_kv_options_count():
    a = tiny()
    fa = model_fingerprint(a)
    a.model.layers[0].self_attn.lora = torch.nn.Linear(4, 4)  # an adapter's parameters
    assert model_fingerprint(a) != fa
    b = tiny()
    assert model_fingerprint(b, kv_dtype=torch.float16) != fa
    assert model_fingerprint(b, kv_scales=[1.0, 2.0]) != fa
    assert model_fingerprint(b, keys="pre") != fa
    assert model_fingerprint(tiny(rope_theta=5000.0)) != fa  # config
    assert model_fingerprint(tiny().to(torch.bfloat16)) != fa
    with pytest.raises(ValueError):
        model_fingerprint(b, keys="after")


def test_hash_seed_separates_the_block_hash_chains():
    groups = [LayerGroupSpec("full", (0,))]
    toks = list(range(1, 10))
    m = KVCacheManager(8, 4, groups, hash_seed=model_fingerprint(tiny()))
    m.add_sequence("a", toks)
    m.plan(["a"], [len(toks)])
    assert m.add_sequence("same-model", toks) == 8  # reused
    other = KVCacheManager(8, 4, groups, hash_seed="another model")
    other.add_sequence("a", toks)
    other.plan(["a"], [len(toks)])
    seeds = [m._seqs["a"].hashes[0], other._seqs["a"].hashes[0]]
    assert seeds[0] != seeds[1]


def _generate(model, ids):
    return model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)


def test_prefix_blocks_are_not_reused_across_models(monkeypatch):
    from kvmem.integrations.hf.cache import PagedKVCache

    reused = []
    orig = PagedKVCache.reuse_prefix

    def spy(self, rows, pads=None, **kw):
        n = orig(self, rows, pads, **kw)
        reused.append(n)
        return n

    monkeypatch.setattr(PagedKVCache, "reuse_prefix", spy)
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    a, b = tiny(seed=0), tiny(seed=0)
    with torch.no_grad():
        b.model.layers[0].self_attn.v_proj.weight.mul_(1.5)
        ref_b = _generate(b, ids)
    kvmem.patch(a, prefix_cache=True, block_size=4)
    kvmem.patch(b, prefix_cache=True, block_size=4)
    try:
        _generate(a, ids)
        _generate(a, ids)
        assert reused == [0, 16]  # the same model reuses its prompt blocks
        b._kvmem_options.pool = a._kvmem_options.pool  # hand model b model a's pool: it must not be used
        out_b = _generate(b, ids)
        assert reused[-1] == 0 and b._kvmem_options.pool is not a._kvmem_options.pool
        assert torch.equal(out_b.sequences, ref_b.sequences)
        with torch.no_grad():  # model a's weights change in place: its cached blocks are stale
            a.model.layers[1].self_attn.k_proj.weight.add_(0.01)
        _generate(a, ids)
        assert reused[-1] == 0
        assert isinstance(output_cache(_generate(a, ids)), PagedKVCache) and reused[-1] == 16
    finally:
        kvmem.unpatch(a)
        kvmem.unpatch(b)
