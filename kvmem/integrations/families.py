"""Which Hugging Face model families kvmem runs, and how their layers map onto layer groups.

One declarative row per tested family (``FAMILIES``). A row only *documents and pins* what the
family uses; the mapping itself is generic and comes from the config:

* layer windows: ``config.layer_types`` when present (``"full_attention"`` -> no window,
  ``"sliding_attention"`` -> ``config.sliding_window``), else ``config.sliding_window`` for every
  layer (Mistral, Phi-3), else full attention (Llama);
* per-call features (sliding window, logit softcap, attention sinks, the softmax scale) are read at
  run time from the keyword arguments the model's attention module hands to HF's attention
  interface (``sliding_window=``, ``softcap=``, ``s_aux=``, ``scaling=``), so q/k norms (Qwen3,
  Gemma3) and RoPE variants need nothing from kvmem.

A decoder-only model that is not in the table takes the *generic* path when it uses HF's
attention interface and none of ``unsupported_features`` applies; anything else is rejected with
an error that names the feature and the supported families.

This module does not import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["Family", "FAMILIES", "UnsupportedModelError", "resolve", "layer_windows", "kv_dims",
           "unsupported_features", "supported_list", "group_layers"]


class UnsupportedModelError(ValueError):
    """The model (or one of its features) cannot run on kvmem's paged attention."""


@dataclass(frozen=True)
class Family:
    """One supported model family.

    Attributes
    ----------
    name: short name used in messages
    model_types: ``config.model_type`` values of the family (text configs)
    examples: checkpoints of the family, for messages
    features: kvmem features the family exercises: ``"window"`` (sliding window on every or some
        layers), ``"alternating"`` (full and sliding layers interleaved: two layer groups),
        ``"softcap"`` (attention-logit softcapping), ``"sinks"`` (per-head sink logits),
        ``"qk_norm"`` (q/k RMSNorm before RoPE; transparent to kvmem)
    """

    name: str
    model_types: Tuple[str, ...]
    examples: str
    features: Tuple[str, ...] = ()


FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("llama",), "SmolLM2, Llama 2/3", ()),
    Family("mistral", ("mistral",), "Mistral 7B", ("window",)),
    Family("qwen2", ("qwen2",), "Qwen2, Qwen2.5", ("window",)),
    Family("qwen3", ("qwen3",), "Qwen3 (dense)", ("window", "qk_norm")),
    Family("gemma2", ("gemma2",), "Gemma 2", ("window", "alternating", "softcap")),
    Family("gemma3", ("gemma3_text",), "Gemma 3 (text)", ("window", "alternating", "qk_norm")),
    Family("phi3", ("phi3",), "Phi-3, Phi-4-mini", ("window",)),
    Family("gpt_oss", ("gpt_oss",), "gpt-oss", ("window", "alternating", "sinks")),
)

_BY_MODEL_TYPE: Dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
_LAYER_TYPES_OK = ("full_attention", "sliding_attention")


def supported_list() -> str:
    """Human-readable list of the supported families (for error messages)."""
    rows = ", ".join(f"{f.name} ({f.examples})" for f in FAMILIES)
    return (f"kvmem supports: {rows}; other decoder-only models that use Hugging Face's attention "
            f"interface with only full/sliding-window causal attention take a generic path")


def text_config(config):
    """The decoder text config of a (possibly composite) HF config."""
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def unsupported_features(config, model=None) -> List[str]:
    """Features of ``config`` (and ``model``) that kvmem cannot run, as human-readable names."""
    bad = []
    if getattr(config, "is_encoder_decoder", False):
        bad.append("encoder-decoder architecture")
    for sub in ("vision_config", "audio_config", "speech_config"):
        if getattr(config, sub, None) is not None:
            bad.append(f"multimodal inputs ({sub})")
    tc = text_config(config)
    layer_types = getattr(tc, "layer_types", None)
    if layer_types is not None:
        odd = sorted({t for t in layer_types if t not in _LAYER_TYPES_OK})
        if odd:
            bad.append(f"layer types {odd} (kvmem runs {list(_LAYER_TYPES_OK)})")
        if "sliding_attention" in layer_types and getattr(tc, "sliding_window", None) is None:
            bad.append("sliding_attention layers without config.sliding_window")
    if getattr(tc, "attention_chunk_size", None) is not None:
        bad.append("chunked attention (attention_chunk_size)")
    if getattr(tc, "use_bidirectional_attention", False):
        bad.append("bidirectional attention (use_bidirectional_attention)")
    if getattr(tc, "is_causal", True) is False:
        bad.append("non-causal attention (is_causal=False)")
    if getattr(tc, "num_kv_shared_layers", 0):
        bad.append("KV sharing between layers (num_kv_shared_layers)")
    if getattr(tc, "kv_lora_rank", None) is not None or getattr(tc, "v_head_dim", None) is not None:
        bad.append("multi-head latent attention / different q-k and v head dims (kv_lora_rank, v_head_dim)")
    if getattr(tc, "alibi", False) or getattr(tc, "position_embedding_type", None) == "alibi":
        bad.append("ALiBi position biases")
    if getattr(tc, "global_head_dim", None) not in (None, getattr(tc, "head_dim", None)):
        bad.append("per-layer head dims (global_head_dim)")
    if model is not None:
        cls = type(model)
        can_set = getattr(cls, "_can_set_attn_implementation", None)
        try:
            uses_interface = bool(can_set()) if can_set is not None else False
        except Exception:  # noqa: BLE001 - a heuristic; treat failure as "unknown"
            uses_interface = False
        if not uses_interface:
            bad.append(f"{cls.__name__} does not dispatch attention through Hugging Face's AttentionInterface")
        if not hasattr(model, "generate"):
            bad.append(f"{cls.__name__} is not a generative (GenerationMixin) model")
    return bad


def resolve(config, model=None) -> Optional[Family]:
    """The family row of ``config`` (None for the generic path); raises if it cannot run.

    Raises
    ------
    UnsupportedModelError
        naming every unsupported feature and the supported families.
    """
    tc = text_config(config)
    model_type = getattr(tc, "model_type", None) or getattr(config, "model_type", "?")
    bad = unsupported_features(config, model)
    if bad:
        raise UnsupportedModelError(
            f"kvmem cannot run model type {model_type!r}: unsupported feature(s): {'; '.join(bad)}. "
            f"{supported_list()}.")
    return _BY_MODEL_TYPE.get(model_type)


def layer_windows(config) -> List[Optional[int]]:
    """Per layer: None (full attention) or the sliding window ``W`` (key j visible iff j > p - W)."""
    tc = text_config(config)
    n = int(tc.num_hidden_layers)
    window = getattr(tc, "sliding_window", None)
    layer_types = getattr(tc, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) < n:
            raise UnsupportedModelError(f"config.layer_types has {len(layer_types)} entries for {n} layers")
        return [int(window) if t == "sliding_attention" else None for t in layer_types[:n]]
    return [int(window) if window is not None else None] * n


def group_layers(windows: List[Optional[int]]) -> List[Tuple[str, Tuple[int, ...], Optional[int]]]:
    """Layer groups: ``("full", layers, None)`` and one ``("sliding_W", layers, W)`` per window."""
    groups: Dict[Optional[int], List[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w, []).append(i)
    out = []
    if None in groups:
        out.append(("full", tuple(groups.pop(None)), None))
    for w in sorted(groups):
        out.append((f"sliding_{w}", tuple(groups[w]), w))
    return out


def kv_dims(config) -> Tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of the decoder."""
    tc = text_config(config)
    heads = int(tc.num_attention_heads)
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return int(tc.num_hidden_layers), int(kv_heads), int(head_dim)
