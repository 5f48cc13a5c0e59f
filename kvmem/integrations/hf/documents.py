"""``kvmem.MemoryBank.from_documents``: documents encoded into a memory bank by chunked prefill.

For each document: the input is ``prefix + doc[:sink_tokens - len(prefix)] + doc`` (the sink
prefix, then the whole document from a block boundary), padded at the end to whole blocks; it
runs through the patched model (``base_model`` only, no LM head) ``chunk_size`` tokens per forward
into a fresh ``PagedKVCache`` with the model's memory bank (extend mode: the pages hold pre-RoPE
keys) and without attached banks; the document's blocks are then read out of the pages of every
memory layer (``kvmem.integrations.hf.banks`` explains the rules).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from kvmem.integrations.hf.compat import cache_kwarg
from kvmem.integrations.hf.identity import kvmem_version, model_identity
from kvmem.integrations.hf.options import options_of
from kvmem.memory import MemoryConfig
from kvmem.ops.memory_select.reference import compute_summaries

__all__ = ["encode_documents"]

_FN = "kvmem.MemoryBank.from_documents"


def _ids(x, tokenizer, what: str) -> List[int]:
    if isinstance(x, str):
        if tokenizer is None:
            raise TypeError(f"{_FN}: {what} is a text: pass tokenizer= (or token ids)")
        return list(tokenizer(x, add_special_tokens=False)["input_ids"])
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(f"{_FN}: {what} must be a 1-D integer tensor of token ids, got {x.dtype} {tuple(x.shape)}")
        return [int(t) for t in x.tolist()]
    if isinstance(x, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        return [int(t) for t in x]
    raise TypeError(f"{_FN}: {what} must be a str, a list of ints or a 1-D tensor, got {type(x).__name__}")


def _pad_id(pad_token_id, tokenizer, model) -> Optional[int]:
    for cand in (pad_token_id, getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                 getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(cand, (list, tuple)):
            cand = cand[0] if cand else None
        if isinstance(cand, int) and not isinstance(cand, bool):
            return cand
    return None


def _plain(value):
    """A config value as JSON (a policy object by its repr)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def encode_documents(cls, model, documents, config: Optional[MemoryConfig], *, tokenizer=None, prefix=None,
                     pad_token_id: Optional[int] = None, progress: bool = True):
    """The body of ``MemoryBank.from_documents`` (``cls``: the bank class)."""
    from kvmem.integrations.hf.generate import make_cache

    opts = options_of(model)
    spec = opts.memory_bank
    if spec is None:
        raise ValueError(f"{_FN}: argument 'model' must be patched with an extend-mode memory bank: "
                         f"kvmem.patch(model, memory_bank=kvmem.MemoryConfig(mode='extend'))")
    cfg = spec.config
    if config is not None:
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"{_FN}: argument 'config' must be a kvmem.MemoryConfig or None, got {type(config).__name__}")
        if config.resolve(model.config, cfg.block_size) != cfg:
            raise ValueError(f"{_FN}: argument 'config' must be the memory_bank the model is patched with "
                             f"({cfg}), got {config}")
    if opts.kv_cache_dtype is not None and opts.kv_cache_dtype.itemsize == 1:
        raise ValueError(f"{_FN}: documents are not banked from a float8 KV cache yet (kv_cache_dtype="
                         f"{opts.kv_cache_dtype}); patch with a float kv_cache_dtype")
    if cfg.mode != "extend":
        raise ValueError(f"{_FN}: documents are banked with pre-RoPE keys, so that they can be attached at any "
                         f"position: patch the model with MemoryConfig(mode='extend'), got mode={cfg.mode!r}")
    if isinstance(documents, (str, torch.Tensor)) or not isinstance(documents, (list, tuple)) or not documents:
        raise TypeError(f"{_FN}: argument 'documents' must be a non-empty list of texts or token-id lists")
    docs = [_ids(d, tokenizer, f"documents[{i}]") for i, d in enumerate(documents)]
    for i, d in enumerate(docs):
        if not d:
            raise ValueError(f"{_FN}: documents[{i}] is empty")
    pre = [] if prefix is None else _ids(prefix, tokenizer, "argument 'prefix'")
    S, bs = cfg.sink_tokens, cfg.block_size
    if len(pre) > S:
        raise ValueError(f"{_FN}: argument 'prefix' must be at most sink_tokens={S} tokens, got {len(pre)}")
    pad = _pad_id(pad_token_id, tokenizer, model)
    inputs, pads = [], []
    for i, d in enumerate(docs):
        fill = (d * (-(-(S - len(pre)) // len(d)) if S > len(pre) else 0))[:S - len(pre)]
        ids = pre + fill + d
        r = (-len(ids)) % bs
        if r and pad is None:
            raise ValueError(f"{_FN}: documents[{i}] is not a whole number of {bs}-token blocks and no pad token is "
                             f"known: pass pad_token_id=")
        inputs.append(ids + [pad] * r)
        pads.append(r)
    options = dataclasses.replace(opts, memory_bank=dataclasses.replace(spec, attached=()), pool=None, prompt=None)
    base = model.base_model
    kwarg = cache_kwarg(base)
    device = next(model.parameters()).device
    keys = {layer: [] for layer in sorted(spec.layers)}
    values = {layer: [] for layer in sorted(spec.layers)}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(x) for x in inputs), desc="kvmem: encoding documents", unit="tok")
    documents_meta = []
    try:
        for ids, r, d in zip(inputs, pads, docs):
            cache = make_cache(options, model, max_batch_size=1, max_cache_len=len(ids))
            try:
                with torch.inference_mode():
                    for c0 in range(0, len(ids), cfg.chunk_size):
                        chunk = torch.tensor([ids[c0:c0 + cfg.chunk_size]], device=device)
                        base(input_ids=chunk, use_cache=True, **{kwarg: cache})
                        if bar is not None:
                            bar.update(chunk.shape[1])
                m = cache.manager
                table = m.block_table(m.seq_ids[0], cache._bank_group)
                pages = torch.tensor(table[S // bs:len(ids) // bs], dtype=torch.long)
                for layer in keys:
                    k_cache, v_cache = cache.pools[layer]
                    keys[layer].append(k_cache.index_select(0, pages.to(k_cache.device)).to("cpu"))
                    values[layer].append(v_cache.index_select(0, pages.to(v_cache.device)).to("cpu"))
            finally:
                cache.release()
            documents_meta.append({"tokens": len(d), "blocks": int(pages.numel()), "padding": r})
    finally:
        if bar is not None:
            bar.close()
    k = {layer: torch.cat(v) for layer, v in keys.items()}
    v = {layer: torch.cat(x) for layer, x in values.items()}
    n = next(iter(k.values())).shape[0]
    summ = {layer: compute_summaries(k[layer], torch.arange(n), summary=cfg.summary) for layer in k}
    meta = {"identity": model_identity(model, kv_dtype=opts.kv_cache_dtype, keys="pre"), "mode": cfg.mode,
            "block_size": bs, "summary": cfg.summary, "layers": sorted(spec.layers), "num_blocks": n,
            "documents": documents_meta, "kvmem_version": kvmem_version(), "prefix_tokens": len(pre),
            "config": {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}}
    return cls(k, v, summ, meta)
