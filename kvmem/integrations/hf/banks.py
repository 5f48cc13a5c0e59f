"""``kvmem.MemoryBank``: memory that outlives a ``generate()`` call -- built from documents, saved,
loaded in another process, attached to later calls, combined.

A bank is whole blocks of keys and values of every memory layer of one model, with their
summaries::

    bank = kvmem.MemoryBank.from_documents(model, [text], tokenizer=tok)   # model patched in extend mode
    bank.save("docs.kvbank")
    bank = kvmem.MemoryBank.load("docs.kvbank")
    kvmem.patch(model, memory_bank=kvmem.MemoryConfig(mode="extend"), banks=[bank])  # or kvmem.set_banks

**Documents.** ``from_documents`` encodes each document by a chunked prefill of the patched model
(its memory bank on, so a document may be far longer than the trained context), keeping the
keys *before* RoPE (extend mode) so the blocks can be placed at any position later. A document
encoded alone would make its first tokens attention sinks, so each document is encoded after a
sink prefix of exactly ``sink_tokens`` tokens that is never banked: ``prefix`` (e.g. the chat
template's system turn, at most ``sink_tokens`` tokens), completed with the document's own first
tokens (which are then encoded a second time, as part of the bank: nothing of the document is
lost). A document whose length is not a whole number of blocks is padded at its end with
``pad_token_id`` (default: the tokenizer's pad token, else the model's ``pad_token_id`` /
``eos_token_id``); the metadata records how many.

**Attaching and combining** (``kvmem.patch(..., banks=[...])`` / ``kvmem.set_banks(model, [...])``).
Each ``generate()`` call writes the attached banks' blocks into pages of its pool once (pages
read-only for the call, on top of ``memory=`` / ``num_blocks=``) and every row's bank starts with
them, in the order given (bank after bank, each in its block order), before the row's own
evicted blocks. They compete in one top-k per (row, KV head, step): ``top_k`` is one budget over
all of them, ties go to the lower bank position (the earlier bank, then the row's own blocks,
oldest first), and selected blocks are placed in that order after the sinks. Combining banks
``[a, b]`` is exactly attaching ``MemoryBank.concat([a, b])``.

**Compatibility.** A bank records its model's identity (``model_identity``: family, class,
layer count, KV heads, head dim, dtype, KV dtype, pre/post-RoPE keys, RoPE type and parameters,
the config digest and a digest of the weights, all from ``kvmem.integrations.hf.fingerprint``),
the kvmem version, the mode, the block size and the memory layers. Attaching it to a model or
configuration that differs raises a ``ValueError`` naming the first difference, before anything
changes. Files: ``kvmem.memory.bankfile`` (safetensors + JSON header, sha256 per tensor, atomic
save).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from kvmem.integrations.hf.identity import IDENTITY as _IDENTITY
from kvmem.integrations.hf.identity import model_identity
from kvmem.memory import MemoryConfig
from kvmem.memory.bankfile import read_bank_file, write_bank_file
from kvmem.ops.memory_select.reference import SUMMARY_KINDS, compute_summaries

__all__ = ["MemoryBank", "model_identity", "set_banks", "check_banks"]

class MemoryBank:
    """Blocks of keys/values of every memory layer of one model, with summaries (module docstring).

    Attributes
    ----------
    keys, values: layer -> ``[num_blocks, block_size, num_kv_heads, head_dim]`` (CPU; keys
        pre-RoPE in extend mode)
    summaries: layer -> ``[num_blocks, num_kv_heads, 2, head_dim]`` fp32 of kind ``summary``
    meta: the metadata (identity, mode, block_size, layers, documents, kvmem version)
    """

    def __init__(self, keys: Dict[int, torch.Tensor], values: Dict[int, torch.Tensor],
                 summaries: Dict[int, torch.Tensor], meta: dict):
        self.keys, self.values, self.summaries, self.meta = dict(keys), dict(values), dict(summaries), dict(meta)
        self._check_shapes("kvmem.MemoryBank")

    # ---------------------------------------------------------------- description
    @property
    def layers(self) -> List[int]:
        return [int(x) for x in self.meta["layers"]]

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    @property
    def summary(self) -> str:
        return str(self.meta["summary"])

    @property
    def num_blocks(self) -> int:
        return int(self.meta["num_blocks"])

    @property
    def num_tokens(self) -> int:
        """Banked tokens (``num_blocks * block_size``, padding included)."""
        return self.num_blocks * self.block_size

    @property
    def identity(self) -> Dict[str, object]:
        return dict(self.meta["identity"])

    def nbytes(self) -> int:
        """Bytes of its keys, values and summaries."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values, self.summaries)
                   for t in d.values())

    def __len__(self) -> int:
        return self.num_blocks

    def __repr__(self) -> str:
        return (f"MemoryBank({self.num_blocks} blocks of {self.block_size} tokens, {len(self.layers)} layers, "
                f"mode={self.mode!r}, {len(self.meta.get('documents', []))} documents)")

    def _check_shapes(self, fn: str) -> None:
        meta = self.meta
        for key in ("layers", "block_size", "mode", "summary", "num_blocks", "identity"):
            if key not in meta:
                raise ValueError(f"{fn}: metadata has no {key!r}")
        ident = meta["identity"]
        n, bs = self.num_blocks, self.block_size
        want = (n, bs, int(ident["num_kv_heads"]), int(ident["head_dim"]))
        for layer in self.layers:
            for what, d, shape in (("keys", self.keys, want), ("values", self.values, want),
                                   ("summaries", self.summaries, (n, want[2], 2, want[3]))):
                t = d.get(layer)
                if t is None or tuple(t.shape) != shape:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"{fn}: {what} of layer {layer} must have shape {shape}, got {got}")
        if set(self.keys) != set(self.layers) or set(self.values) != set(self.layers):
            raise ValueError(f"{fn}: keys/values must be given for exactly the layers {self.layers}")
        if self.summary not in SUMMARY_KINDS:
            raise ValueError(f"{fn}: summary must be one of {SUMMARY_KINDS}, got {self.summary!r}")

    # ---------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write the bank to ``path`` (one safetensors file with a JSON header; atomic: an interrupted
        save leaves an earlier file at ``path`` intact). ``kvmem.memory.bankfile``."""
        tensors = {}
        for layer in self.layers:
            tensors[f"k.{layer}"] = self.keys[layer]
            tensors[f"v.{layer}"] = self.values[layer]
            tensors[f"s.{layer}"] = self.summaries[layer]
        write_bank_file(path, tensors, {"bank": self.meta})

    @classmethod
    def load(cls, path) -> "MemoryBank":
        """Read a bank written by ``save`` (no unpickling). Raises FileNotFoundError,
        IsADirectoryError, or ``kvmem.memory.bankfile.BankFileError`` (a ValueError) for a truncated,
        corrupted or foreign file."""
        from kvmem.memory.bankfile import BankFileError

        tensors, header = read_bank_file(path)
        meta = header.get("bank")
        if not isinstance(meta, dict):
            raise BankFileError(f"kvmem.MemoryBank.load: {path!r} has no 'bank' metadata")
        try:
            layers = [int(x) for x in meta["layers"]]
            parts = {p: {layer: tensors[f"{p}.{layer}"] for layer in layers} for p in "kvs"}
            return cls(parts["k"], parts["v"], parts["s"], meta)
        except (KeyError, TypeError, ValueError) as e:
            raise BankFileError(f"kvmem.MemoryBank.load: {path!r} is not a consistent memory bank ({e})") from None

    # ---------------------------------------------------------------- combining
    @classmethod
    def concat(cls, banks: Sequence["MemoryBank"]) -> "MemoryBank":
        """One bank holding the blocks of ``banks`` in order (they must be of one model and layout)."""
        banks = list(banks)
        if not banks or not all(isinstance(b, MemoryBank) for b in banks):
            raise TypeError("kvmem.MemoryBank.concat: argument 'banks' must be a non-empty sequence of MemoryBank")
        first = banks[0]
        for b in banks[1:]:
            _same_layout(first, b, "kvmem.MemoryBank.concat")
        meta = dict(first.meta)
        meta["num_blocks"] = sum(b.num_blocks for b in banks)
        meta["documents"] = [d for b in banks for d in b.meta.get("documents", [])]
        cat = {p: {layer: torch.cat([getattr(b, p)[layer] for b in banks]) for layer in first.layers}
               for p in ("keys", "values", "summaries")}
        return cls(cat["keys"], cat["values"], cat["summaries"], meta)

    # ---------------------------------------------------------------- use
    def summaries_of(self, layer: int, kind: str) -> torch.Tensor:
        """``[num_blocks, Hkv, 2, D]`` fp32 summaries of kind ``kind`` (recomputed from the keys when the
        bank stores another kind)."""
        if kind == self.summary:
            return self.summaries[layer]
        k = self.keys[layer]
        return compute_summaries(k, torch.arange(k.shape[0]), summary=kind)

    def check(self, model, config: MemoryConfig, layers, kv_dtype: Optional[torch.dtype] = None) -> None:
        """Raise a ``ValueError`` naming the first way this bank does not fit ``model`` patched with the
        resolved ``config`` (memory layers ``layers``, KV dtype ``kv_dtype``)."""
        keys = "pre" if config.mode == "extend" else "post"
        if self.identity.get("keys") != keys:
            raise ValueError(
                f"kvmem: a memory bank of {'post-RoPE (exact mode)' if self.identity.get('keys') == 'post' else 'pre-RoPE (extend mode)'} "
                f"keys cannot be attached in {config.mode} mode (its keys would be rotated "
                f"{'twice' if keys == 'pre' else 'never'}); build the bank with MemoryConfig(mode={config.mode!r})")
        ident = model_identity(model, kv_dtype=kv_dtype, keys=keys)
        for key, what in _IDENTITY:
            if self.identity.get(key) != ident[key]:
                mine, theirs = self.identity.get(key), ident[key]
                if key in ("config", "weights", "rope"):
                    raise ValueError(f"kvmem: this memory bank was built for another model: {what} differs "
                                     f"(bank {str(mine)[:80]!r}, model {str(theirs)[:80]!r})")
                raise ValueError(f"kvmem: this memory bank was built for {what} {mine!r}, the model has {theirs!r}")
        if self.block_size != config.block_size:
            raise ValueError(f"kvmem: this memory bank has blocks of {self.block_size} tokens, the model's memory_bank "
                             f"block_size is {config.block_size}")
        if sorted(layers) != self.layers:
            raise ValueError(f"kvmem: this memory bank holds layers {self.layers}, the model's memory layers are "
                             f"{sorted(layers)} (dense_layers differs?)")

    # ---------------------------------------------------------------- documents
    @classmethod
    def from_documents(cls, model, documents, config: Optional[MemoryConfig] = None, *, tokenizer=None,
                       prefix=None, pad_token_id: Optional[int] = None, progress: bool = True) -> "MemoryBank":
        """Encode ``documents`` (texts, with ``tokenizer``, or lists / 1-D tensors of token ids) into a
        bank by chunked prefill of ``model``, which must be patched with an extend-mode memory bank
        (``config``, when given, must be that configuration). ``prefix``: the sink prefix (text or
        ids, at most ``sink_tokens``), see the module docstring. ``progress``: a tqdm bar over the
        tokens. The model's attached banks are not used while encoding."""
        from kvmem.integrations.hf.documents import encode_documents

        return encode_documents(cls, model, documents, config, tokenizer=tokenizer, prefix=prefix,
                                pad_token_id=pad_token_id, progress=progress)


def _same_layout(a: MemoryBank, b: MemoryBank, fn: str) -> None:
    for key in ("mode", "block_size", "layers"):
        if a.meta[key] != b.meta[key]:
            raise ValueError(f"{fn}: the banks differ in {key} ({a.meta[key]!r} vs {b.meta[key]!r})")
    for key, what in _IDENTITY:
        if a.identity.get(key) != b.identity.get(key):
            raise ValueError(f"{fn}: the banks were built for different models ({what} differs)")
    for layer in a.layers:
        if a.keys[layer].dtype != b.keys[layer].dtype:
            raise ValueError(f"{fn}: the banks' dtypes differ ({a.keys[layer].dtype} vs {b.keys[layer].dtype})")
    if a.summary != b.summary:
        raise ValueError(f"{fn}: the banks' summaries differ ({a.summary!r} vs {b.summary!r})")


def check_banks(model, spec, banks, kv_dtype) -> tuple:
    """Validate ``banks`` (a sequence of ``MemoryBank``) for ``model`` with the ``BankSpec`` ``spec``;
    returns them as a tuple. Errors name the argument and leave everything unchanged."""
    if banks is None:
        return ()
    if not isinstance(banks, (list, tuple)):
        raise TypeError(f"kvmem: argument 'banks' must be a list of kvmem.MemoryBank, got {type(banks).__name__}")
    if banks and spec is None:
        raise ValueError("kvmem: argument 'banks' needs memory_bank=kvmem.MemoryConfig(...) (banks are attached to "
                         "the memory layers)")
    if banks and kv_dtype is not None and kv_dtype.itemsize == 1:
        raise ValueError(f"kvmem: argument 'banks' is not supported with a float8 KV cache yet (kv_cache_dtype="
                         f"{kv_dtype}): attach banks to a float cache")
    for i, b in enumerate(banks):
        if not isinstance(b, MemoryBank):
            raise TypeError(f"kvmem: argument 'banks'[{i}] must be a kvmem.MemoryBank, got {type(b).__name__}")
        b.check(model, spec.config, spec.layers, kv_dtype)
    return tuple(banks)


def set_banks(model, banks: Sequence[MemoryBank]) -> None:
    """Attach ``banks`` to a model patched with a memory bank, replacing any attached before
    (``[]`` detaches every bank); the next ``generate()`` call uses them. Errors (a bank of another
    model, dtype, RoPE or mode) change nothing."""
    from kvmem.integrations.hf.options import options_of

    opts = options_of(model)
    spec = opts.memory_bank
    if spec is None:
        raise ValueError("kvmem.set_banks: argument 'model' must be patched with memory_bank=kvmem.MemoryConfig(...)")
    if not isinstance(banks, (list, tuple)):
        raise TypeError(f"kvmem.set_banks: argument 'banks' must be a list of kvmem.MemoryBank, got "
                        f"{type(banks).__name__}")
    spec.attached = check_banks(model, spec, list(banks), opts.kv_cache_dtype)
    state = getattr(model, "_kvmem_state", None)
    if state is not None:  # patch() again with these banks stays a no-op
        state.args["banks"] = list(banks) or None

