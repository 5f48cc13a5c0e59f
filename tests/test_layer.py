"""The one layer step (``kvmem.layer.run_layer``): every attention path runs through its stages, and
``kvmem.nn.PagedAttention`` and the HF cache's step give identical outputs through it."""

import pytest
import torch

import kvmem.layer as layer
from kvmem.cache import KVCacheManager, LayerGroupSpec
from kvmem.nn import PagedAttention


@pytest.fixture
def recorded(monkeypatch):
    """Record every LayerStep at its last stage (the stage list read at each call)."""
    steps = []

    def record(step):
        steps.append(step)

    monkeypatch.setattr(layer, "STAGES", layer.STAGES + (record,))
    return steps


def test_stages_are_named_and_ordered():
    assert [s.__name__ for s in layer.STAGES] == ["write", "evict", "select", "attend"]


def test_paged_attention_module_runs_the_stages(recorded):
    torch.manual_seed(0)
    Hq, Hkv, D, bs = 4, 2, 16, 4
    mgr = KVCacheManager(16, bs, [LayerGroupSpec("full", (0,))])
    pools = mgr.make_pools(Hkv, D, torch.float32, fill=0.0)
    mgr.add_sequence("a")
    plan = mgr.plan(["a"], [7])
    q, k, v = torch.randn(7, Hq, D), torch.randn(7, Hkv, D), torch.randn(7, Hkv, D)
    out = PagedAttention(Hq, Hkv, D, layer_idx=0)(q, k, v, *pools[0], plan)
    (step,) = recorded
    assert step.out is out and step.context.layer_idx == 0 and step.k is k
    assert torch.equal(pools[0][0].reshape(-1, Hkv, D)[plan.for_layer(0).slot_mapping], k)  # written


def test_custom_stage_list_replaces_the_default():
    torch.manual_seed(0)
    mgr = KVCacheManager(8, 4, [LayerGroupSpec("full", (0,))])
    k_cache, v_cache = mgr.make_pools(1, 16, torch.float32, fill=0.0)[0]
    mgr.add_sequence(0)
    md = mgr.plan([0], [3]).for_layer(0)
    q, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    seen = []
    ops = PagedAttention(2, 1, 16)._ops
    out = layer.run_layer(ops, q, k, v, k_cache, v_cache, md, layer.LayerAttention(0.25),
                          stages=(layer.write, lambda s: seen.append(s.context.layer_idx), layer.attend))
    assert seen == [None] and out.shape == (3, 2, 16)


transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_eager_step_and_nn_module_are_the_same_path(recorded):
    import kvmem
    from kvmem.integrations.hf.compat import cache_kwarg

    model = kvmem.patch(_tiny_llama())
    try:
        cache = kvmem.PagedKVCache(model.config, block_size=4, num_blocks=32)
        ids = torch.randint(1, 128, (1, 9))
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        assert [s.context.layer_idx for s in recorded] == [0, 1]
        for step in list(recorded):  # the recorded eager step, re-run by kvmem.nn.PagedAttention on fresh pools
            cos_sin = step.context.position_embeddings
            assert cos_sin is not None and cos_sin[0].shape[-2:] == (9, 16)  # recorded by patch's pre-hook
            a = step.attention
            mod = PagedAttention(4, 2, 16, scale=a.scale, window=a.window, softcap=a.softcap)
            kc, vc = torch.zeros_like(step.k_cache), torch.zeros_like(step.v_cache)
            again = mod(step.q, step.k, step.v, kc, vc, step.metadata)
            assert torch.equal(again, step.out)
    finally:
        kvmem.unpatch(model)


def test_hf_dense_and_static_steps_run_the_stages(recorded):
    import kvmem
    from kvmem.integrations import DecodeGraphRunner

    model = kvmem.patch(_tiny_llama())
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(1, 128, (1, 5)), use_cache=False)  # dense fallback
        assert len(recorded) == 2 and all(s.k is None for s in recorded)  # nothing written
        recorded.clear()
        from kvmem.integrations.hf.compat import cache_kwarg

        cache = kvmem.PagedKVCache(model.config, block_size=4, num_blocks=32, max_cache_len=64)
        ids = torch.randint(1, 128, (1, 6))
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
            recorded.clear()
            DecodeGraphRunner(model, cuda_graph=False).decode_step(ids[:, -1:], cache)
        assert [s.context.layer_idx for s in recorded] == [0, 1]
        assert all(s.metadata.max_seqlen_q == 1 and s.k is not None for s in recorded)  # static metadata
        assert cache.get_seq_length() == 7
    finally:
        kvmem.unpatch(model)
