"""RoPE of a Hugging Face model, for the memory bank's ``extend`` mode (torch + transformers only).

In ``extend`` mode pages hold keys *before* RoPE; they are rotated on load at remapped positions.
HF rotates q and k inside each attention module, so kvmem takes them after RoPE together with the
``(cos, sin)`` the module applied (a forward pre-hook records ``position_embeddings``) and
un-rotates them exactly; re-rotation uses one table built by calling the model's *own* rotary
module, so every scaling (linear, dynamic, yarn, longrope, llama3, ...) is whatever the model does.

Conventions
-----------
* ``cos`` / ``sin`` are what HF's rotary modules return: ``[B, S, w]`` or ``[S, w]``, attention
  scaling (yarn's mscale, longrope's factor) already inside. Most families duplicate the halves
  (``w = rot_dim``); gpt-oss returns one half only (``w = rot_dim / 2``, ``half_table=True``;
  :func:`rope_half_table` tells which).
* Rotation is "neox" (rotate halves, ``rotate_half``) over the first ``rot_dim`` channels; channels
  past ``rot_dim`` (partial rotary: Phi-3, GPT-NeoX) pass through.
* kvmem's table: ``[num_positions, rot_dim]`` fp32, the cos half then the sin half.

Nothing here patches module forwards or ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import List, Optional, Tuple

import torch
from torch import nn

from kvmem.integrations.families import UnsupportedModelError, text_config

__all__ = ["rotate_half", "rotate", "unrotate", "rope_table", "rope_layout", "rotary_dim",
           "rope_half_table", "rotary_module"]

# Families HF rotates GPT-J style (pairs of adjacent channels); the module probe below also catches
# families not listed here whose modeling file defines an interleaved ``rotate_half``.
_INTERLEAVED_MODEL_TYPES = ("gptj", "codegen", "cohere", "cohere2", "cohere2_moe", "glm", "glm4",
                            "glm4v", "helium", "ernie4_5", "ernie4_5_moe", "chatglm")
_NO_ROPE_EMBEDDINGS = ("absolute", "learned", "alibi", "relative_key", "relative_key_query")
_EXACT_HINT = ("extend mode needs RoPE (rotate-half, as HF's Llama applies it) to store keys before "
               "RoPE and rotate them at remapped positions; use MemoryConfig(mode=\"exact\") for this model")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last dim (HF's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _full_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  half_table: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos``/``sin`` with duplicated halves, broadcastable to ``x`` ``[B, H, S, D]``."""
    cos, sin = cos.float(), sin.float()
    if half_table:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    rot = cos.shape[-1]
    if rot % 2 or rot > x.shape[-1]:
        raise ValueError(f"rotary width {rot} must be even and at most the head dim {x.shape[-1]}")
    if cos.dim() == 3 and x.dim() == 4:  # [B, S, rot] -> [B, 1, S, rot] (HF's unsqueeze_dim=1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_table: bool,
           inverse: bool) -> torch.Tensor:
    cos, sin = _full_cos_sin(x, cos, sin, half_table)
    rot = cos.shape[-1]
    x_rot = x[..., :rot].float()
    out = x_rot * cos  # in place from here: a 32k prompt's fp32 queries are ~75 MiB a copy
    turned = rotate_half(x_rot).mul_(sin)
    if inverse:
        out.sub_(turned).div_(cos * cos + sin * sin)
    else:
        out.add_(turned)
    del turned
    out = out.to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:].expand(*out.shape[:-1], x.shape[-1] - rot)), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, half_table: bool = False) -> torch.Tensor:
    """Apply RoPE: ``x·cos + rotate_half(x)·sin`` over the first ``rot_dim`` channels (fp32 math).

    Parameters
    ----------
    x: [B, H, S, D] queries or keys (any float dtype; the result has it too)
    cos, sin: [B, S, w] or [S, w] as HF's rotary module returns them (or anything broadcastable
        to ``x[..., :rot_dim]``); ``rot_dim = w``, or ``2w`` with ``half_table``
    half_table: cos/sin hold one half only (gpt-oss); the other half repeats it

    Returns
    -------
    [B, H, S, D] rotated ``x``; channels past ``rot_dim`` unchanged.
    """
    return _apply(x, cos, sin, half_table, inverse=False)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, half_table: bool = False) -> torch.Tensor:
    """Undo RoPE exactly: ``(x·cos − rotate_half(x)·sin) / (cos² + sin²)`` over ``rot_dim`` (fp32 math).

    The division makes it the exact inverse of :func:`rotate` (and of HF's
    ``apply_rotary_pos_emb``) also when the tables carry an attention factor (yarn's mscale:
    ``cos² + sin² = mscale²``) or were rounded to bf16.

    Parameters
    ----------
    x: [B, H, S, D] queries or keys after HF applied RoPE with these ``cos``/``sin``
    cos, sin: [B, S, w] or [S, w] as the attention module received them (``position_embeddings``)
    half_table: cos/sin hold one half only (gpt-oss; see :func:`rope_half_table`)

    Returns
    -------
    [B, H, S, D] pre-RoPE ``x`` in ``x``'s dtype; channels past ``rot_dim`` unchanged.
    """
    return _apply(x, cos, sin, half_table, inverse=True)


# ---------------------------------------------------------------------------------------------
# the model's rotary module


def _rotary_candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "rotary_emb" or type(module).__name__.endswith("RotaryEmbedding"):
            if any(part in name for part in ("vision", "visual", "audio")):
                continue
            found.append((name, module))
    return found


def rotary_module(model: nn.Module, layer_idx: Optional[int] = None) -> Optional[nn.Module]:
    """The model's text rotary-embedding module (``model.model.rotary_emb`` on Llama-likes), or None.

    With several (per-layer rotary modules), ``layer_idx`` picks the one under ``layers.{layer_idx}.``;
    without it, the model-level one (the first found).
    """
    inner = getattr(model, "model", None)
    for holder in (model, inner, getattr(inner, "language_model", None)):
        module = getattr(holder, "rotary_emb", None) if holder is not None else None
        if isinstance(module, nn.Module):
            return module
    found = _rotary_candidates(model)
    if not found:
        return None
    if layer_idx is not None:
        key = f"layers.{int(layer_idx)}."
        for name, module in found:
            if key in name + ".":
                return module
    top = [m for n, m in found if "layers." not in n]
    return (top or [m for _, m in found])[0]


def _layer_type_of(model: nn.Module, rotary: nn.Module, layer_idx: Optional[int],
                   layer_type: Optional[str]) -> Optional[str]:
    """The ``layer_type`` argument the rotary module's forward takes (Gemma 3), else None."""
    try:
        params = inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "layer_type" not in params:
        return None
    if layer_type is None and layer_idx is not None:
        types = getattr(text_config(model.config), "layer_types", None)
        if types is not None:
            layer_type = types[int(layer_idx)]
    if layer_type is None:
        known = getattr(rotary, "layer_types", None) or list(getattr(rotary, "rope_type", {}) or ())
        if not known:
            raise ValueError(f"{type(rotary).__name__} takes a layer_type; pass layer_idx= or layer_type=")
        layer_type = "full_attention" if "full_attention" in known else sorted(known)[0]
    return layer_type


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.buffers()) + list(module.parameters()):
        return t.device
    return torch.device("cpu")


def _call_rotary(model: nn.Module, num_positions: int, device, layer_idx, layer_type):
    """(cos, sin) [num_positions, w] fp32 from a copy of the model's rotary module (no side effects)."""
    rotary = rotary_module(model, layer_idx)
    if rotary is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module. {_EXACT_HINT}")
    kind = _layer_type_of(model, rotary, layer_idx, layer_type)
    # dynamic / longrope modules change their own state on a call (inv_freq, max_seq_len_cached):
    # call a copy so that the model's next forward is untouched.
    rotary = copy.deepcopy(rotary)
    if device is None:
        device = _module_device(rotary)
    rotary = rotary.to(device)
    positions = torch.arange(int(num_positions), device=device)[None]
    probe = torch.zeros(1, int(num_positions), 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        out = rotary(probe, positions) if kind is None else rotary(probe, positions, layer_type=kind)
    cos, sin = out
    return cos.reshape(-1, cos.shape[-1]).float(), sin.reshape(-1, sin.shape[-1]).float()


def rope_half_table(model: nn.Module, *, layer_idx: Optional[int] = None,
                    layer_type: Optional[str] = None) -> bool:
    """True when the model's cos/sin hold one half only (gpt-oss), False when halves are duplicated.

    Decided from the module's output at position 1: duplicated halves are equal, one half of
    distinct frequencies is not.
    """
    cos, _ = _call_rotary(model, 2, None, layer_idx, layer_type)
    return _is_half_table(cos)


def _is_half_table(cos: torch.Tensor) -> bool:
    """cos [>=2, w]: its halves differ at position 1 (one half of distinct frequencies)."""
    width = cos.shape[-1]
    if width % 2:
        return True
    return not torch.equal(cos[1, :width // 2], cos[1, width // 2:])


def rotary_dim(model: nn.Module, *, layer_idx: Optional[int] = None, layer_type: Optional[str] = None) -> int:
    """Channels of the head that RoPE rotates (``head_dim × partial_rotary_factor``).

    Read from the width of what the model's own rotary module returns (so Phi-3 / GPT-NeoX partial
    rotary and gpt-oss's half tables come out right without reading config keys).
    """
    cos, _ = _call_rotary(model, 2, None, layer_idx, layer_type)
    width = int(cos.shape[-1])
    return 2 * width if _is_half_table(cos) else width


def rope_table(model: nn.Module, num_positions: int, device=None, *, layer_idx: Optional[int] = None,
               layer_type: Optional[str] = None) -> torch.Tensor:
    """kvmem's RoPE table at positions ``0 .. num_positions-1``, from the model's own rotary module.

    Parameters
    ----------
    model: a HF model (``...ForCausalLM`` or its base model)
    num_positions: table length
    device: where the table lives (default: the rotary module's device)
    layer_idx, layer_type: for models whose rotary differs by layer type (Gemma 3: local and global
        bases); default the full-attention one

    Returns
    -------
    [num_positions, rot_dim] fp32: ``cos[:, :rot_dim//2]`` then ``sin[:, :rot_dim//2]``, attention
    scaling included.

    Notes
    -----
    The table is what the module returns for **one forward covering positions 0 .. num_positions-1**.
    Scalings that pick their factors by sequence length follow that length: ``longrope`` uses its
    short factors when ``num_positions <= original_max_position_embeddings`` and its long factors
    otherwise (for every position of the table); ``dynamic`` NTK rescales only when
    ``num_positions`` exceeds the context the module has cached (``max_position_embeddings`` unless
    the model already ran longer). The model's module itself is never changed (a copy is called).
    Tables built in fp32, also for bf16 models (HF casts cos/sin to the activations' dtype).
    """
    cos, sin = _call_rotary(model, num_positions, device, layer_idx, layer_type)
    half_table = _is_half_table(cos) if num_positions >= 2 else rope_half_table(
        model, layer_idx=layer_idx, layer_type=layer_type)
    if half_table:
        return torch.cat((cos, sin), dim=-1).contiguous()
    half = cos.shape[-1] // 2
    return torch.cat((cos[:, :half], sin[:, :half]), dim=-1).contiguous()


def _modeling_module(model: nn.Module):
    return sys.modules.get(type(model).__module__)


def _interleaved_probe(model: nn.Module) -> Optional[str]:
    """Why the model's modeling file rotates GPT-J style (pairs of adjacent channels), or None."""
    module = _modeling_module(model)
    if module is None:
        return None
    if hasattr(module, "rotate_every_two"):
        return f"{module.__name__} rotates with rotate_every_two"
    fn = getattr(module, "rotate_half", None)
    if callable(fn):
        x = torch.arange(1.0, 5.0)
        try:
            got = fn(x)
        except Exception:  # noqa: BLE001 - a probe; an odd signature says nothing
            return None
        if not torch.equal(got, rotate_half(x)):
            return f"{module.__name__}.rotate_half is not the rotate-halves (neox) rotation"
    return None


def rope_layout(model: nn.Module) -> str:
    """``"neox"`` (rotate halves) for the families HF rotates with ``rotate_half``.

    Raises
    ------
    UnsupportedModelError
        for interleaved (GPT-J style) RoPE, or a model without RoPE (absolute / learned / ALiBi
        positions, no rotary module), naming the feature and suggesting ``mode="exact"``.
    """
    tc = text_config(model.config)
    model_type = getattr(tc, "model_type", "?")
    kind = getattr(tc, "position_embedding_type", None)
    if kind in _NO_ROPE_EMBEDDINGS or getattr(tc, "alibi", False):
        raise UnsupportedModelError(
            f"model type {model_type!r} has no RoPE (position_embedding_type={kind!r}"
            f"{', alibi' if getattr(tc, 'alibi', False) else ''}). {_EXACT_HINT}")
    if model_type in _INTERLEAVED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} uses interleaved (GPT-J style) RoPE, which kvmem's extend mode "
            f"does not rotate. {_EXACT_HINT}")
    why = _interleaved_probe(model)
    if why is not None:
        raise UnsupportedModelError(
            f"model type {model_type!r} uses interleaved (GPT-J style) RoPE ({why}). {_EXACT_HINT}")
    if rotary_module(model) is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no rotary embedding module (no RoPE). {_EXACT_HINT}")
    return "neox"
