"""kvmem under tensor parallelism: the KV heads each rank holds (HF ``tp_plan="auto"``, torch.distributed).

Under ``from_pretrained(..., tp_plan="auto")`` (run with ``torchrun``) HF shards every attention
module's ``q_proj``/``k_proj``/``v_proj`` by output rows (whole heads when the counts divide) and
all-reduces after ``o_proj``; the attention function sees only this rank's query and KV heads. So
each rank's ``PagedKVCache`` is sized for *its* KV heads (``rank_kv_heads``): the pools, the memory
bank's summaries and every byte count (``usage()``, ``memory=``, ``CacheFullError``) are per rank,
total / ranks. Query head ``i`` of a rank reads local KV head ``i // (Hq / Hkv)``: with contiguous
shards of whole heads a GQA group never straddles two ranks. Per-head parameters follow the rank's
heads (sink logits: ``rank_sink_logits``; per-head float8 scales: ``rank_kv_scales``).

Which heads a rank holds is read from the modules, not assumed from the config: the local rows of
``k_proj``'s weight (``DTensor.to_local()`` or the plain local shard older transformers keep), so
the same code serves transformers versions whose TP layers differ, and models whose plan does not
shard attention (gpt-oss, Phi-3's gathered ``qkv_proj``) keep every head on every rank. The count is
taken when ``generate()`` builds its cache, so ``kvmem.patch`` may come before or after sharding
(``kvmem.patch`` also checks an already sharded model at once, before changing it).

KV heads < ranks (or any count the ranks do not divide): HF's plan then splits a head's features
over ranks (transformers 5.17 and 5.24 shard ``k_proj`` rows in equal chunks, and their own
attention fails to reshape them); kvmem raises ``ValueError`` naming ``num_key_value_heads`` and ``tp_size`` instead
(HF's continuous-batching cache refuses the same).

No communication: kvmem sends nothing between ranks. Everything on the host (block tables,
allocation, prefix reuse, sliding-window frees, memory-bank bookkeeping, ``CacheFullError``) is a
function of inputs every rank has identically (token ids, attention masks, ``generate()``'s
arguments, the block counts, which are equal because every rank holds as many heads), so every rank
takes the same decisions; an error one rank raises, every rank raises at the same point of the step,
between the same two collectives (``CacheFullError``: when the first layer's keys arrive, before
its ``o_proj`` all-reduce), so no rank waits on one that stopped. This needs
what HF's tensor parallelism needs anyway: the same prompts and ``generate()`` arguments on every
rank (and, for sampling, the same seed). The one rank-local failure is the device's own (out of
memory); torch.distributed's timeout ends the other ranks then. The memory bank selects per
(row, KV head): each rank selects for its own heads.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvmem.integrations import families

__all__ = ["local_tensor", "tp_size", "rank_kv_heads", "rank_head_offset", "rank_kv_scales", "rank_sink_logits"]


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - torch built without distributed
        return None
    return DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``DTensor.to_local()``); any other tensor unchanged."""
    cls = _dtensor_class()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


def tp_size(model) -> int:
    """The model's tensor-parallel degree (``model.tp_size``; 1 when not sharded)."""
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    return int(size) if isinstance(size, int) and size > 1 else 1


def _attention_modules(model):
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention"):
            yield m


def _local_rows(module, name: str, sharded: bool) -> Optional[int]:
    """Rows of ``module.<name>``'s weight this rank holds, or None when it has no such projection
    (or the model is not sharded: neither ``tp_size > 1`` nor a ``DTensor`` weight)."""
    weight = getattr(getattr(module, name, None), "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    local = local_tensor(weight)
    return int(local.shape[0]) if sharded or local is not weight else None


def rank_kv_heads(model) -> int:
    """The KV heads this rank's attention holds (the config's ``num_key_value_heads`` unless sharded).

    Read from the first attention module's ``k_proj`` (and ``q_proj``) local weight rows; a model
    without separate projections (fused ``qkv_proj``) keeps the config's count.

    Raises
    ------
    ValueError
        when the sharding splits a KV head over ranks (``num_key_value_heads`` not a multiple of
        ``tp_size``, e.g. fewer KV heads than ranks) or changes the query heads per KV head.
    """
    _, kv_heads, head_dim = families.kv_dims(model.config)
    q_heads = int(families.text_config(model.config).num_attention_heads)
    module = next(_attention_modules(model), None)
    size = tp_size(model)
    rows = None if module is None else _local_rows(module, "k_proj", size > 1)
    if rows is None or rows == kv_heads * head_dim:  # not sharded (or no separate k_proj)
        return kv_heads
    size = max(size, -(-kv_heads * head_dim // max(rows, 1)))  # a DTensor without model.tp_size
    if rows % head_dim or kv_heads % size:
        raise ValueError(
            f"kvmem: tensor parallelism over tp_size={size} ranks gives this rank {rows} of k_proj's "
            f"{kv_heads * head_dim} output rows, not whole KV heads of head_dim {head_dim}: the config's "
            f"num_key_value_heads={kv_heads} must be a multiple of tp_size={size} (kvmem keeps whole KV heads "
            f"and their query heads on one rank). Run on a number of ranks that divides {kv_heads}.")
    local_kv = rows // head_dim
    q_rows = _local_rows(module, "q_proj", True)
    if q_rows is not None and q_rows // head_dim * kv_heads != local_kv * q_heads:
        raise ValueError(
            f"kvmem: this rank holds {q_rows // head_dim} query heads and {local_kv} KV heads; a GQA group of "
            f"{q_heads // kv_heads} query heads per KV head (num_attention_heads={q_heads}, "
            f"num_key_value_heads={kv_heads}) must stay on one rank (tp_size={size})")
    return local_kv


def rank_sink_logits(s_aux: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The sink logits ``[num_heads]`` of this rank's query heads.

    ``s_aux``: what the module passed, ``[num_heads]`` (sharded, or a module run on local
    parameters), or a ``DTensor``: its local shard, or the rank's slice of a replicated
    ``[num_heads * tp_size]``.
    """
    cls = _dtensor_class()
    if cls is not None and isinstance(s_aux, cls):
        mesh, local = s_aux.device_mesh, s_aux.to_local()
        if local.numel() == num_heads * mesh.size() != num_heads:
            rank = mesh.get_local_rank()
            local = local.reshape(-1)[rank * num_heads:(rank + 1) * num_heads]
        s_aux = local
    if s_aux.numel() != num_heads:
        raise ValueError(f"kvmem: sink logits (s_aux) of {s_aux.numel()} heads for {num_heads} query heads "
                         f"on this rank")
    return s_aux


def rank_head_offset(model, num_kv_heads: int) -> int:
    """The model-wide index of this rank's first KV head (its ``num_kv_heads`` heads are contiguous):
    the rank's place on the mesh of ``k_proj``'s ``DTensor`` weight, else its global rank modulo
    ``tp_size``; 0 when the model is not sharded."""
    _, heads, _ = families.kv_dims(model.config)
    if num_kv_heads == heads:
        return 0
    module = next(_attention_modules(model), None)
    weight = getattr(getattr(module, "k_proj", None), "weight", None)
    mesh = getattr(weight, "device_mesh", None)
    if mesh is not None:
        return mesh.get_local_rank() * num_kv_heads
    import torch.distributed as dist

    return (dist.get_rank() % tp_size(model)) * num_kv_heads


def rank_kv_scales(scales, model, num_kv_heads: int):
    """A float8 cache's ``KVScales`` for this rank: per-head scales of the whole model
    (``[num_key_value_heads]``, e.g. calibrated on the unsharded model) sliced to the rank's heads;
    0-d scales, scales already of ``num_kv_heads`` and None unchanged."""
    _, heads, _ = families.kv_dims(model.config)
    if scales is None or num_kv_heads == heads:
        return scales
    from kvmem.cache.scales import KVScales

    start = rank_head_offset(model, num_kv_heads)

    def part(t: torch.Tensor) -> torch.Tensor:
        return t[start:start + num_kv_heads] if t.dim() == 1 and t.shape[0] == heads else t

    return KVScales([part(t) for t in scales.k], [part(t) for t in scales.v], headroom=scales.headroom,
                    dtype=scales.dtype)
