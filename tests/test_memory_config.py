"""MemoryConfig: defaults derived from the model's config, and every bad input named."""

import pytest
from transformers import GPT2Config, LlamaConfig

from kvmem.memory import MemoryConfig


def _smollm2_like(**kw):
    return LlamaConfig(max_position_embeddings=8192, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, hidden_size=576, rope_theta=100000.0, **kw)


def test_defaults_for_smollm2():
    cfg = MemoryConfig(mode="extend").resolve(_smollm2_like(), page_size=16)
    assert cfg.is_resolved
    assert (cfg.sink_tokens, cfg.window, cfg.block_size, cfg.chunk_size, cfg.top_k) == (64, 1024, 16, 512, 155)
    assert cfg.sink_blocks == 4 and cfg.summary == "mean" and cfg.dense_layers == 0
    assert cfg.max_distance == 64 + 155 * 16 + 1024 + 16 + 512 <= 8192 // 2


@pytest.mark.parametrize("context", [256, 512, 2048, 32768, 131072])
@pytest.mark.parametrize("page_size", [16, 32])
def test_defaults_fit_half_the_trained_context(context, page_size):
    cfg = MemoryConfig().resolve(LlamaConfig(max_position_embeddings=context), page_size)
    assert cfg.max_distance <= context // 2 or cfg.top_k == 0
    assert cfg.max_distance <= context
    assert cfg.sink_tokens % cfg.block_size == 0 and cfg.window % cfg.block_size == 0 and cfg.window >= cfg.block_size


def test_given_values_are_kept_and_exact_mode_needs_no_rope():
    cfg = MemoryConfig(mode="exact", sink_tokens=32, window=256, top_k=0, chunk_size=64, dense_layers=2,
                       summary="box").resolve(GPT2Config(), page_size=16)
    assert (cfg.sink_tokens, cfg.window, cfg.top_k, cfg.chunk_size, cfg.dense_layers, cfg.summary) == (32, 256, 0, 64, 2, "box")
    assert MemoryConfig(block_size=32).resolve(_smollm2_like(), page_size=16).block_size == 32
    with pytest.raises(ValueError, match="unset sizes"):
        MemoryConfig().max_distance


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mode="fast"), ValueError, "'mode'"),
    (dict(summary="median"), ValueError, "'summary'"),
    (dict(top_k=-1), ValueError, "'top_k'.*>= 0"),
    (dict(top_k=2.5), TypeError, "'top_k'"),
    (dict(top_k=True), TypeError, "'top_k'"),
    (dict(sink_tokens=-16), ValueError, "'sink_tokens'"),
    (dict(sink_tokens="64"), TypeError, "'sink_tokens'"),
    (dict(window=0), ValueError, "'window'"),
    (dict(window=100.0), TypeError, "'window'"),
    (dict(chunk_size=0), ValueError, "'chunk_size'"),
    (dict(chunk_size=1.5), TypeError, "'chunk_size'"),
    (dict(block_size=0), ValueError, "'block_size'"),
    (dict(dense_layers=-1), ValueError, "'dense_layers'"),
    (dict(dense_layers=None), TypeError, "'dense_layers'"),
    (dict(block_size=16, window=40), ValueError, "'window'.*whole blocks.*block_size=16"),
    (dict(block_size=16, sink_tokens=8), ValueError, "'sink_tokens'.*whole blocks"),
])
def test_bad_values_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MemoryConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=40), "'window'.*whole blocks.*16"),
    (dict(sink_tokens=24), "'sink_tokens'.*whole blocks"),
    (dict(block_size=24), "'block_size'.*page size 16"),
    (dict(top_k=500), r"largest remapped distance .*\+ chunk_size = .* must be <= the trained context 8192"),
    (dict(window=8192), "largest remapped distance"),
    (dict(dense_layers=31), "'dense_layers'.*30"),
])
def test_bad_against_the_model(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**kwargs).resolve(_smollm2_like(), page_size=16)


def test_extend_mode_needs_supported_rope():
    with pytest.raises(ValueError, match="rotary position embeddings.*mode='exact'"):
        MemoryConfig(mode="extend").resolve(GPT2Config(), page_size=16)
    weird = _smollm2_like()
    weird.rope_parameters = {"rope_type": "mystery", "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_type='mystery'"):
        MemoryConfig(mode="extend").resolve(weird, page_size=16)
    MemoryConfig(mode="exact").resolve(weird, page_size=16)  # exact mode does not rotate
    with pytest.raises(ValueError, match="'page_size'"):
        MemoryConfig().resolve(_smollm2_like(), page_size=0)


def test_frozen():
    with pytest.raises(Exception):
        MemoryConfig().top_k = 3
