"""kvmem.integrations.hf.rope: exact un-rotation against each family's own ``apply_rotary_pos_emb``,
tables from the model's own rotary module, and the named errors of models extend mode cannot run.

Small random-weight models built from config classes; nothing is downloaded.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvmem.integrations.families import UnsupportedModelError  # noqa: E402
from kvmem.integrations.hf.rope import (rope_half_table, rope_layout, rope_table, rotary_dim,  # noqa: E402
                                        rotary_module, rotate, unrotate)

HEAD_DIM = 16
TRAINED = 64  # max_position_embeddings (original for the scaled types)
BF16_EPS = torch.finfo(torch.bfloat16).eps


def _dims(**extra):
    dims = dict(hidden_size=4 * HEAD_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, head_dim=HEAD_DIM)
    dims.update(extra)
    return dims


def _rope_params(rope_type):
    """rope_parameters of each type (transformers 5.x format, rope_theta inside)."""
    base = {"rope_type": rope_type, "rope_theta": 10000.0}
    if rope_type == "linear":
        base.update(factor=2.0)
    elif rope_type == "dynamic":
        base.update(factor=2.0)
    elif rope_type == "yarn":
        base.update(factor=4.0, original_max_position_embeddings=TRAINED)
    elif rope_type == "llama3":
        base.update(factor=8.0, original_max_position_embeddings=TRAINED // 4, low_freq_factor=1.0,
                    high_freq_factor=4.0)
    elif rope_type == "longrope":
        half = HEAD_DIM // 2
        base.update(original_max_position_embeddings=TRAINED // 4, factor=4.0,
                    short_factor=[1.0 + 0.1 * i for i in range(half)],
                    long_factor=[1.0 + 0.7 * i for i in range(half)])
    return base


def _llama(rope_type):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**_dims(max_position_embeddings=TRAINED), rope_parameters=_rope_params(rope_type))
    return LlamaForCausalLM(cfg).eval()


def _phi3(partial=0.5):
    from transformers import Phi3Config, Phi3ForCausalLM
    cfg = Phi3Config(**_dims(max_position_embeddings=TRAINED, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": partial})
    return Phi3ForCausalLM(cfg).eval()


MODELS = {
    "default": (lambda: _llama("default"), "llama"),
    "linear": (lambda: _llama("linear"), "llama"),
    "llama3": (lambda: _llama("llama3"), "llama"),
    "yarn": (lambda: _llama("yarn"), "llama"),
    "longrope": (lambda: _llama("longrope"), "llama"),
    "dynamic": (lambda: _llama("dynamic"), "llama"),
    "partial": (_phi3, "phi3"),
}
_CACHE = {}


def _model(name):
    if name not in _CACHE:
        build, family = MODELS[name]
        _CACHE[name] = (build(), family)
    return _CACHE[name]


def _apply_hf(family, q, k, cos, sin):
    """The family's own ``apply_rotary_pos_emb`` (each modeling file has its copy)."""
    import importlib
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return module.apply_rotary_pos_emb(q, k, cos, sin)


def _positions(seed, batch=2, seq=9, top=4 * TRAINED):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, top, (batch, seq), generator=g)
    pos[0, -1] = top - 1  # fixes max(position)+1 (dynamic / longrope pick their factors by it)
    return pos


def _pair_magnitude(x, rot):
    """Per channel, the norm of its rotation pair (x_i, x_{i±rot/2}); past rot_dim, |x|."""
    h = rot // 2
    pair = torch.sqrt(x[..., :h].float() ** 2 + x[..., h:rot].float() ** 2)
    return torch.cat((pair, pair, x[..., rot:].float().abs()), dim=-1)


def _cos_sin(model, pos, dtype):
    probe = torch.zeros(1, dtype=dtype)
    with torch.no_grad():
        return rotary_module(model)(probe, pos)


@pytest.mark.parametrize("name", list(MODELS))
def test_unrotate_inverts_hf_fp32(name):
    model, family = _model(name)
    pos = _positions(1)
    cos, sin = _cos_sin(model, pos, torch.float32)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, pos.shape[1], HEAD_DIM, generator=g)
    k = torch.randn(2, 2, pos.shape[1], HEAD_DIM, generator=g)
    q_rot, k_rot = _apply_hf(family, q, k, cos, sin)
    rot = cos.shape[-1]
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        back = unrotate(x_rot, cos, sin)
        assert back.dtype == torch.float32
        rel = ((back - x).abs() / _pair_magnitude(x, rot)).max().item()
        assert rel <= 1e-6, (name, rel)
        assert torch.equal(back[..., rot:], x[..., rot:])
        torch.testing.assert_close(rotate(x, cos, sin), x_rot, rtol=0, atol=1e-6)
        # [S, rot] tables (one row of positions) broadcast the same way
        one = unrotate(x_rot[:1], cos[0], sin[0])
        torch.testing.assert_close(one, back[:1], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_unrotate_inverts_hf_bf16(name):
    model, family = _model(name)
    pos = _positions(3)
    cos, sin = _cos_sin(model, pos, torch.bfloat16)  # HF casts cos/sin to the activations' dtype
    assert cos.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, pos.shape[1], HEAD_DIM, generator=g).bfloat16()
    k = torch.randn(2, 2, pos.shape[1], HEAD_DIM, generator=g).bfloat16()
    q_rot, k_rot = _apply_hf(family, q, k, cos, sin)
    rot = cos.shape[-1]
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        back = unrotate(x_rot, cos, sin)
        assert back.dtype == torch.bfloat16
        ulps = ((back.float() - x.float()).abs() / (BF16_EPS * _pair_magnitude(x, rot))).max().item()
        assert ulps <= 2.0, (name, ulps)


@pytest.mark.parametrize("name", list(MODELS))
def test_rope_table_is_the_module_at_those_positions(name):
    model, _ = _model(name)
    top = 4 * TRAINED
    pos = _positions(5, top=top)
    cos, sin = _cos_sin(model, pos, torch.float32)
    table = rope_table(model, top)
    rot = rotary_dim(model)
    assert table.shape == (top, rot) and table.dtype == torch.float32
    want = torch.cat((cos[..., :rot // 2], sin[..., :rot // 2]), dim=-1)
    torch.testing.assert_close(table[pos], want, rtol=0, atol=1e-6)
    assert rope_layout(model) == "neox"
    assert not rope_half_table(model)


def test_rotary_dim_partial_and_full():
    assert rotary_dim(_model("default")[0]) == HEAD_DIM
    assert rotary_dim(_model("partial")[0]) == HEAD_DIM // 2


def test_rope_table_length_dependent_types_follow_the_length():
    """longrope: short factors up to original_max_position_embeddings, long ones past it; dynamic:
    rescaled only past max_position_embeddings; and the model's own module is left untouched."""
    for name, short_len in (("longrope", TRAINED // 4), ("dynamic", TRAINED)):
        model = _llama(name)  # fresh: calling the module itself (other tests) changes a dynamic one
        module = rotary_module(model)
        inv_before = module.inv_freq.clone()
        short = rope_table(model, short_len)
        long = rope_table(model, 4 * TRAINED)
        assert not torch.allclose(short, long[:short_len]), name
        torch.testing.assert_close(rope_table(model, short_len), short, rtol=0, atol=0)
        assert torch.equal(module.inv_freq, inv_before), name
        assert module.max_seq_len_cached == TRAINED


def test_rope_table_matches_what_attention_receives():
    """The (cos, sin) a forward pre-hook sees on an attention module equal the table's rows."""
    model, _ = _model("yarn")
    seen = []
    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_embeddings"]),
                                            with_kwargs=True)
    try:
        pos = torch.tensor([[3, 17, 40, 100, 255]])
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), position_ids=pos)
    finally:
        handle.remove()
    cos, sin = seen[0]
    table = rope_table(model, 256)
    torch.testing.assert_close(table[pos[0]], torch.cat((cos[0, :, :8], sin[0, :, :8]), -1), rtol=0, atol=1e-6)


def test_gemma3_layer_types():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(**_dims(max_position_embeddings=TRAINED, num_hidden_layers=2, sliding_window=8),
                           layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    full = rope_table(model, 32)
    assert torch.equal(rope_table(model, 32, layer_idx=1), full)
    local = rope_table(model, 32, layer_idx=0)
    torch.testing.assert_close(rope_table(model, 32, layer_type="sliding_attention"), local, rtol=0, atol=0)
    assert not torch.allclose(local, full)  # different bases
    pos = torch.arange(32)[None]
    cos, sin = rotary_module(model)(torch.zeros(1), pos, "sliding_attention")
    torch.testing.assert_close(local, torch.cat((cos[0, :, :8], sin[0, :, :8]), -1), rtol=0, atol=1e-6)
    assert rope_layout(model) == "neox"


def test_gpt_oss_half_tables():
    """gpt-oss's rotary returns one half ([.., head_dim/2]); half_table=True undoes its rotation."""
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb
    cfg = GptOssConfig(**_dims(max_position_embeddings=TRAINED, num_local_experts=2, num_experts_per_tok=1,
                               sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                       rope_parameters=_rope_params("yarn") | {"rope_theta": 150000.0})
    model = GptOssForCausalLM(cfg).eval()
    assert rope_half_table(model) and rotary_dim(model) == HEAD_DIM and rope_layout(model) == "neox"
    pos = _positions(6)
    cos, sin = _cos_sin(model, pos, torch.float32)
    assert cos.shape[-1] == HEAD_DIM // 2
    q = torch.randn(2, 4, pos.shape[1], HEAD_DIM)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    back = unrotate(q_rot, cos, sin, half_table=True)
    assert ((back - q).abs() / _pair_magnitude(q, HEAD_DIM)).max().item() <= 1e-6
    torch.testing.assert_close(rotate(q, cos, sin, half_table=True), q_rot, rtol=0, atol=1e-6)
    table = rope_table(model, 4 * TRAINED)
    assert table.shape == (4 * TRAINED, HEAD_DIM)
    torch.testing.assert_close(table[pos], torch.cat((cos, sin), -1), rtol=0, atol=1e-6)


def test_interleaved_rope_is_rejected():
    from transformers import CohereConfig, CohereForCausalLM
    model = CohereForCausalLM(CohereConfig(**_dims(max_position_embeddings=TRAINED))).eval()
    with pytest.raises(UnsupportedModelError, match=r"interleaved.*mode=\"exact\""):
        rope_layout(model)


def test_no_rope_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(UnsupportedModelError, match=r"RoPE.*mode=\"exact\""):
        rope_layout(model)
    with pytest.raises(UnsupportedModelError, match="no rotary embedding module"):
        rope_table(model, 8)


def test_shape_errors():
    x = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="rotary width"):
        unrotate(x, torch.ones(3, 10), torch.zeros(3, 10))
    with pytest.raises(ValueError, match="differ in shape"):
        unrotate(x, torch.ones(3, 8), torch.zeros(3, 4))


def _families():
    from test_hf_families import BUILD
    return sorted(BUILD)


@pytest.mark.parametrize("family", _families())
def test_every_family_table_matches_its_attention_modules(family):
    """Per layer (Gemma 3: local and global bases), the (cos, sin) each attention module receives are
    the rows of ``rope_table(model, n, layer_idx=i)``; every supported family is "neox"."""
    from test_hf_families import build
    model = build(family)
    assert rope_layout(model) == "neox"
    seen = {}
    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__(m.layer_idx, kw["position_embeddings"]), with_kwargs=True))
    pos = torch.tensor([[0, 5, 33, 70, 200, 511]])
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8]]), position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(len(model.model.layers)))
    for i, (cos, sin) in seen.items():
        half_table = rope_half_table(model, layer_idx=i)
        rot = rotary_dim(model, layer_idx=i)
        assert rot == (2 if half_table else 1) * cos.shape[-1]
        want = torch.cat((cos, sin), -1) if half_table else torch.cat((cos[..., :rot // 2], sin[..., :rot // 2]), -1)
        torch.testing.assert_close(rope_table(model, 512, layer_idx=i)[pos[0]], want[0], rtol=0, atol=1e-6)
