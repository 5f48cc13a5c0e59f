"""Per-sequence paged KV cache bookkeeping across layer groups, and per-step planning.

Design
------
* **One allocator per layer group.** Every group has its own pages (each of its layers has K/V
  pools ``[num_blocks, block_size, num_kv_heads, head_dim]``) and its own block table per sequence,
  so block ids of different groups are unrelated and each group can be sized on its own (a
  sliding-window group needs far fewer blocks). Block hashes (prefix reuse) are shared: the hash of
  block ``i`` of a sequence is the same in every group.
* **Check, then commit.** Every mutating call validates its arguments and simulates its effect on
  refcounts and free blocks for *all* groups first; only then does it change anything. A
  ``CacheFullError`` or ``ValueError`` therefore leaves allocators, tables and pending copies
  exactly as they were.
* **Sliding windows.** Query ``p`` sees keys ``j > p - W``. When a step's first query sits at the
  old length ``L`` (``visible_key_range``: ``lo = max(0, L - W + 1)``) no query of this or any later
  step sees keys ``< lo``, so blocks lying wholly below ``lo`` are freed at ``plan()`` (before this
  step's allocations, which may reuse them) and their table entries become -1.
* **Copy-on-write.** Appending into a sequence's last, partly filled block that other sequences
  also reference (after ``fork``) gives the sequence a fresh block and records a pending copy
  ``(src, dst)``; ``apply_copies(pools)`` must run before the step's cache writes.
* **Host cost.** Block tables are kept per sequence as growable int32 numpy rows, so ``plan()``
  builds ``[batch, max_blocks]`` tables with row copies, not per-element Python work; each tensor
  is built once on the host and sent with one non-blocking copy (from pinned memory for CUDA). No
  device tensor is ever read back. ``max_seqlen_k`` is the longest ``seq_lens`` entry in every
  group (key positions are absolute; a window only narrows which of them are read).
* **Prefix reuse.** With token ids known, full blocks are registered under chain hashes when a step
  fills them (at plan time, i.e. before that step's forward writes them: add a sequence that reuses
  them only after the step that fills them has run). ``add_sequence(seq_id, token_ids)`` takes the
  longest cached prefix back instead of allocating it. Answers (``register_tokens``), per-sequence
  hash namespaces, the dedup of a batch's shared full blocks at plan time and growth are
  ``kvmem.cache.prefix``.
"""

from __future__ import annotations

import operator
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kvmem.cache.allocator import BlockAllocator, block_hashes
from kvmem.cache.metadata import GroupUsage, LayerGroupSpec, StepMetadata, StepPlan
from kvmem.cache.prefix import _PrefixOps, _seed_arg
from kvmem.cache.reserve import _Reservation
from kvmem.cache.sequence import _BlockRow, _cdiv, _int_arg, _Seq, _upload
from kvmem.cache.tensors import _PoolTensors

__all__ = ["KVCacheManager"]


class KVCacheManager(_Reservation, _PrefixOps, _PoolTensors):
    """Block tables of every sequence in every layer group, and the step planner.

    Parameters
    ----------
    num_blocks: blocks per group: an int for every group, or a mapping group name -> int
    block_size: tokens per block (the pools' dim 1)
    groups: the layer groups; names unique, layers disjoint
    device: where ``plan()`` puts its tensors by default
    max_blocks_per_seq: fixed block-table width for every plan (CUDA-graph friendly shapes);
        None = the batch's widest sequence
    bytes_per_block: bytes of one block over all layers of a group, K and V (see
        ``kvmem.cache.page_bytes``): an int for every group or a mapping; enables bytes in ``usage()``
    hash_seed: bytes the prefix-reuse hash chain starts from (the parent of every sequence's first
        block), e.g. ``kvmem.model_fingerprint(model)``: blocks are only ever reused by sequences
        hashed from the same seed, so two models never share cached blocks. None: the plain chain
    """

    def __init__(
        self,
        num_blocks: Union[int, Mapping[str, int]],
        block_size: int,
        groups: Sequence[LayerGroupSpec],
        device: Union[str, torch.device] = "cpu",
        *,
        max_blocks_per_seq: Optional[int] = None,
        bytes_per_block: Union[None, int, Mapping[str, int]] = None,
        hash_seed: Union[None, bytes, str] = None,
    ):
        self._block_size = _int_arg(block_size, "__init__", "block_size", 1)
        groups = tuple(groups)
        if not groups or not all(isinstance(g, LayerGroupSpec) for g in groups):
            raise TypeError("KVCacheManager: groups must be a non-empty sequence of LayerGroupSpec")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"KVCacheManager: group names must be unique, got {names}")
        self._layer_to_group: Dict[int, str] = {}
        for g in groups:
            for layer in g.layers:
                if layer in self._layer_to_group:
                    raise ValueError(
                        f"KVCacheManager: layer {layer} is in groups {self._layer_to_group[layer]!r} and {g.name!r}"
                    )
                self._layer_to_group[layer] = g.name
        self._groups: Dict[str, LayerGroupSpec] = {g.name: g for g in groups}
        self._allocators: Dict[str, BlockAllocator] = {}
        for g in groups:
            nb = num_blocks[g.name] if isinstance(num_blocks, Mapping) else num_blocks
            nb = _int_arg(nb, "__init__", f"num_blocks[{g.name!r}]", 1)
            self._allocators[g.name] = BlockAllocator(nb, self._block_size)
        self.device = torch.device(device)
        self.max_blocks_per_seq = (
            None if max_blocks_per_seq is None else _int_arg(max_blocks_per_seq, "__init__", "max_blocks_per_seq", 1)
        )
        if bytes_per_block is None or isinstance(bytes_per_block, Mapping):
            self._bytes_per_block = dict(bytes_per_block or {})
        else:
            self._bytes_per_block = {g: _int_arg(bytes_per_block, "__init__", "bytes_per_block", 0) for g in names}
        self.hash_seed: Optional[bytes] = _seed_arg(hash_seed, "__init__", "hash_seed")
        self._seqs: Dict[Hashable, _Seq] = {}
        #: group name -> copy-on-write (src_block, dst_block) pairs not yet applied to the pools
        self.pending_copies: Dict[str, List[Tuple[int, int]]] = {g: [] for g in names}

    # ------------------------------------------------------------------ queries
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def groups(self) -> Tuple[LayerGroupSpec, ...]:
        return tuple(self._groups.values())

    @property
    def layer_to_group(self) -> Dict[int, str]:
        return dict(self._layer_to_group)

    @property
    def seq_ids(self) -> List[Hashable]:
        return list(self._seqs)

    def allocator(self, group: str) -> BlockAllocator:
        """The allocator of ``group`` (read it; mutate it only through the manager)."""
        return self._allocators[self._check_group(group)]

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_len(self, seq_id) -> int:
        """KV length of ``seq_id`` (tokens whose slots are reserved)."""
        return self._get(seq_id, "seq_len").num_tokens

    def block_table(self, seq_id, group: str) -> List[int]:
        """A copy of ``seq_id``'s block table in ``group`` (-1 = freed by the sliding window)."""
        return self._get(seq_id, "block_table").tables[self._check_group(group)].tolist()

    # -------------------------------------------------------------- sequences
    def add_sequence(self, seq_id: Hashable, token_ids: Optional[Sequence[int]] = None, *,
                     namespace: Union[None, bytes, str] = None) -> int:
        """Start a sequence, reusing cached blocks of its longest known prefix.

        Parameters
        ----------
        seq_id: any hashable id not in use
        token_ids: [prompt_len] the prompt's token ids, or None (no prefix reuse; block hashes are
            then only kept for tokens later passed to ``extend``/``plan``)

        Returns
        -------
        num_cached_tokens: the sequence starts with this KV length (a multiple of ``block_size``,
            at most ``prompt_len - 1`` so the last prompt token is always computed); plan the
            remaining ``prompt_len - num_cached_tokens`` tokens next.

        The sequence's hash chain starts from ``namespace`` (bytes or str, e.g. the model's
        ``kvmem.model_fingerprint``; default the manager's ``hash_seed``): blocks are only ever
        shared between sequences of one namespace (``kvmem.cache.prefix``).
        """
        if seq_id in self._seqs:
            raise ValueError(f"KVCacheManager.add_sequence: sequence {seq_id!r} already exists")
        tokens = [] if token_ids is None else self._tokens_arg(token_ids, "add_sequence", "token_ids")
        bs = self._block_size
        seq = _Seq(self._groups)
        seq.token_ids = tokens
        seq.seed = self.hash_seed if namespace is None else _seed_arg(namespace, "add_sequence")
        seq.hashes = block_hashes(tokens, bs, seq.seed)
        k_max = max(0, (len(tokens) - 1) // bs)
        present = {g: [a.lookup(h) for h in seq.hashes[:k_max]] for g, a in self._allocators.items()}
        # Full groups need every block of the prefix; sliding groups only those a query at the
        # prefix's end still sees. Take the longest prefix every group can serve.
        k = k_max
        for g, spec in self._groups.items():
            if spec.window is None:
                k = min(k, next((i for i, b in enumerate(present[g]) if b is None), k_max))
        missing = {}
        for g, spec in self._groups.items():
            if spec.window is not None:
                m = np.concatenate([[0], np.cumsum([b is None for b in present[g]])])
                missing[g] = m
        while k > 0:
            if all(m[k] - m[self._dead_blocks(g, k * bs)] == 0 for g, m in missing.items()):
                break
            k -= 1
        for g, a in self._allocators.items():
            dead = self._dead_blocks(g, k * bs)
            table = [-1] * dead + present[g][dead:k]
            a.incref(table[dead:])
            seq.tables[g] = _BlockRow(table)
            seq.num_dead[g] = dead
        seq.num_tokens = k * bs
        seq.num_registered = k
        self._seqs[seq_id] = seq
        return k * bs

    def fork(self, src_seq_id: Hashable, new_seq_id: Hashable) -> None:
        """Make ``new_seq_id`` a copy of ``src_seq_id`` sharing all its blocks (beam search)."""
        src = self._get(src_seq_id, "fork")
        if new_seq_id in self._seqs:
            raise ValueError(f"KVCacheManager.fork: sequence {new_seq_id!r} already exists")
        new = src.clone()
        for g, a in self._allocators.items():
            a.incref(new.tables[g].live_reversed())
        self._seqs[new_seq_id] = new

    def free_sequence(self, seq_id: Hashable) -> None:
        """Drop ``seq_id`` and its references (tail blocks first, so they are evicted first)."""
        seq = self._get(seq_id, "free_sequence")
        for g, a in self._allocators.items():
            a.free(seq.tables[g].live_reversed())
        del self._seqs[seq_id]

    def truncate(self, seq_id: Hashable, new_len: int) -> None:
        """Crop ``seq_id`` to ``new_len`` tokens, freeing the blocks past it.

        Raises
        ------
        ValueError
            if ``new_len`` exceeds the length, or a sliding group already freed keys a query at
            ``new_len`` would see.
        """
        seq = self._get(seq_id, "truncate")
        new_len = _int_arg(new_len, "truncate", "new_len", 0)
        if new_len > seq.num_tokens:
            raise ValueError(
                f"KVCacheManager.truncate: new_len={new_len} exceeds sequence {seq_id!r}'s length {seq.num_tokens}"
            )
        bs = self._block_size
        for g in self._groups:
            if new_len > 0 and self._dead_blocks(g, new_len) < seq.num_dead[g]:
                raise ValueError(
                    f"KVCacheManager.truncate: cannot crop sequence {seq_id!r} to {new_len} tokens: group "
                    f"{g!r} (window {self._groups[g].window}) already freed the blocks a query at "
                    f"{new_len} would see (blocks < {seq.num_dead[g]} are gone)"
                )
        keep = _cdiv(new_len, bs)
        for g, a in self._allocators.items():
            table = seq.tables[g]
            a.free(table.live_reversed(keep))
            table.truncate(keep)
            seq.num_dead[g] = min(seq.num_dead[g], keep)
        seq.num_tokens = new_len
        if seq.token_ids is not None:
            del seq.token_ids[new_len:]
        del seq.hashes[new_len // bs :]
        seq.num_registered = min(seq.num_registered, new_len // bs)

    def extend(
        self, seq_id: Hashable, num_new_tokens: int, token_ids: Optional[Sequence[int]] = None
    ) -> Dict[str, List[int]]:
        """Reserve slots for ``num_new_tokens`` new tokens of one sequence.

        Allocates blocks as needed, copies-on-write a shared last partial block (see
        ``pending_copies``) and, in sliding groups, frees blocks no future query sees. Prefer
        ``plan()`` in a model loop: it does this for a whole batch and builds the metadata.

        Parameters
        ----------
        token_ids: [num_new_tokens] ids of the new tokens, or None (needed for prefix reuse only)

        Returns
        -------
        group name -> [num_new_tokens] slots (``block * block_size + offset``) of the new tokens
        """
        n = _int_arg(num_new_tokens, "extend", "num_new_tokens", 0)
        seq = self._get(seq_id, "extend")
        L = seq.num_tokens
        pos = np.arange(L, L + n)
        skips = self._reserve([seq_id], [n], [token_ids], "extend")
        bs = self._block_size
        out = {}
        for g in self._groups:
            slots = seq.tables[g].view()[pos // bs].astype(np.int64) * bs + pos % bs
            for _, i in skips[g]:  # shared with a block already cached: nothing to write
                slots[i * bs - L : (i + 1) * bs - L] = -1
            out[g] = slots.tolist()
        return out

    # ---------------------------------------------------------------- planning
    def plan(
        self,
        seq_ids: Sequence[Hashable],
        num_new_tokens: Sequence[int],
        device: Union[None, str, torch.device] = None,
        *,
        token_ids: Optional[Sequence[Optional[Sequence[int]]]] = None,
        max_blocks_per_seq: Optional[int] = None,
        pad_batch_to: Optional[int] = None,
        pad_tokens_to: Optional[int] = None,
    ) -> StepPlan:
        """Reserve this step's slots for a batch (all or nothing) and build every group's metadata.

        Parameters
        ----------
        seq_ids: [batch] distinct existing sequence ids; row ``b`` of every tensor is ``seq_ids[b]``
        num_new_tokens: [batch] new tokens (queries) per sequence this step (0 allowed); the new
            tokens of the step are laid out sequence after sequence
        device: where the tensors go (default: the manager's device)
        token_ids: None, or [batch] of (None or [num_new_tokens[b]] token ids) for prefix reuse
        max_blocks_per_seq: fixed block-table width (overrides the manager's)
        pad_batch_to: pad the batch to this many rows (seq_lens 0, no queries, table -1)
        pad_tokens_to: pad slot_mapping to this many tokens (-1)

        Returns
        -------
        StepPlan with one StepMetadata per group. Pending copy-on-write copies (``plan.copies``)
        must be applied with ``apply_copies(pools)`` before the step's cache writes.

        Raises
        ------
        CacheFullError
            when a group lacks free blocks; nothing is changed.
        """
        seq_ids = list(seq_ids)
        nums = [_int_arg(n, "plan", "num_new_tokens[i]", 0) for n in num_new_tokens]
        if len(nums) != len(seq_ids):
            raise ValueError(
                f"KVCacheManager.plan: num_new_tokens has {len(nums)} entries for {len(seq_ids)} sequences"
            )
        tok_lists = [None] * len(seq_ids) if token_ids is None else list(token_ids)
        if len(tok_lists) != len(seq_ids):
            raise ValueError(
                f"KVCacheManager.plan: token_ids has {len(tok_lists)} entries for {len(seq_ids)} sequences"
            )
        device = self.device if device is None else torch.device(device)
        bs = self._block_size
        seqs = [self._get(s, "plan") for s in seq_ids]
        batch, num_tokens = len(seqs), sum(nums)
        new_lens = [s.num_tokens + n for s, n in zip(seqs, nums)]
        width = self.max_blocks_per_seq if max_blocks_per_seq is None else _int_arg(
            max_blocks_per_seq, "plan", "max_blocks_per_seq", 1)
        needed_width = max([_cdiv(L, bs) for L in new_lens], default=0)
        if width is None:
            width = max(1, needed_width)
        elif needed_width > width:
            raise ValueError(
                f"KVCacheManager.plan: a sequence needs {needed_width} blocks but max_blocks_per_seq={width}"
            )
        rows = batch if pad_batch_to is None else _int_arg(pad_batch_to, "plan", "pad_batch_to", 0)
        if rows < batch:
            raise ValueError(f"KVCacheManager.plan: pad_batch_to={rows} is smaller than the batch ({batch})")
        padded_tokens = num_tokens if pad_tokens_to is None else _int_arg(pad_tokens_to, "plan", "pad_tokens_to", 0)
        if padded_tokens < num_tokens:
            raise ValueError(
                f"KVCacheManager.plan: pad_tokens_to={padded_tokens} is smaller than the step's {num_tokens} tokens"
            )

        skips = self._reserve(seq_ids, nums, tok_lists, "plan")  # validates the rest, then commits

        q_lens = np.asarray(nums, dtype=np.int64)
        lens = np.asarray(new_lens, dtype=np.int64)
        cu = np.zeros(rows + 1, dtype=np.int32)
        cu[1 : batch + 1] = np.cumsum(q_lens)
        cu[batch + 1 :] = num_tokens
        seq_lens = np.zeros(rows, dtype=np.int32)
        seq_lens[:batch] = lens
        # Token t of row r sits at position lens[r] - q_lens[r] + (t - cu[r]).
        row_of = np.repeat(np.arange(batch), q_lens)
        pos = np.arange(num_tokens) - np.repeat(cu[:batch].astype(np.int64), q_lens) + np.repeat(lens - q_lens, q_lens)
        seq_lens_t, cu_t = _upload(seq_lens, device), _upload(cu, device)
        max_q = int(q_lens.max()) if batch else 0
        max_k = int(lens.max()) if batch else 0
        groups = {}
        n_blocks = np.asarray([len(s.tables[next(iter(self._groups))]) for s in seqs], dtype=np.int64)
        filled = np.zeros((rows, width), dtype=bool)
        filled[:batch] = np.arange(width)[None, :] < n_blocks[:, None]
        for g, spec in self._groups.items():
            # One C-level pass over all the rows (every group's table has ceil(seq_len / bs) entries).
            table = np.full((rows, width), -1, dtype=np.int32)
            if batch:
                table[filled] = np.concatenate([s.tables[g].view() for s in seqs])
            slots = np.full(padded_tokens, -1, dtype=np.int64)
            slots[:num_tokens] = table[row_of, pos // bs].astype(np.int64) * bs + pos % bs
            for r, i in skips[g]:  # a block shared with another row / an earlier call: written once
                t0 = int(cu[r]) + i * bs - int(lens[r] - q_lens[r])
                slots[t0 : t0 + bs] = -1
            groups[g] = StepMetadata(
                block_table=_upload(table, device),
                seq_lens=seq_lens_t,
                cu_seqlens_q=cu_t,
                slot_mapping=_upload(slots, device),
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
                window=spec.window,
            )
        return StepPlan(
            groups=groups,
            layer_to_group=dict(self._layer_to_group),
            seq_ids=tuple(seq_ids),
            num_tokens=num_tokens,
            copies={g: tuple(c) for g, c in self.pending_copies.items() if c},
        )

    # ------------------------------------------------------------------ memory
    def usage(self) -> Dict[str, GroupUsage]:
        """Per group: blocks used/free/cached, tokens held, bytes (when ``bytes_per_block`` given)."""
        out = {}
        bs = self._block_size
        for g, a in self._allocators.items():
            tokens = sum(max(0, s.num_tokens - s.num_dead[g] * bs) for s in self._seqs.values())
            per = self._bytes_per_block.get(g)
            out[g] = GroupUsage(
                name=g,
                num_blocks=a.num_blocks,
                blocks_used=a.num_used,
                blocks_free=a.num_free,
                blocks_cached=a.num_cached,
                num_tokens=tokens,
                bytes_used=None if per is None else per * a.num_used,
                bytes_total=None if per is None else per * a.num_blocks,
            )
        return out

    def reset_prefix_cache(self) -> None:
        """Forget all block hashes (cached free blocks become plain free)."""
        for a in self._allocators.values():
            a.reset_prefix_cache()

    def debug_state(self) -> dict:
        """A deep, comparable snapshot of all bookkeeping (for tests and debugging)."""
        return {
            "allocators": {g: a.debug_state() for g, a in self._allocators.items()},
            "seqs": {k: s.state() for k, s in self._seqs.items()},
            "pending_copies": {g: tuple(c) for g, c in self.pending_copies.items()},
        }

    # --------------------------------------------------------------- internals
    def _check_group(self, group: str) -> str:
        if group not in self._groups:
            raise ValueError(f"KVCacheManager: unknown layer group {group!r} (groups: {list(self._groups)})")
        return group

    def _get(self, seq_id, fn: str) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"KVCacheManager.{fn}: unknown sequence {seq_id!r}") from None
        except TypeError:
            raise TypeError(
                f"KVCacheManager.{fn}: sequence ids must be hashable, got {type(seq_id).__name__}"
            ) from None

    def _tokens_arg(self, token_ids, fn: str, arg: str) -> List[int]:
        out = []
        for t in token_ids:
            if isinstance(t, bool):
                raise TypeError(f"KVCacheManager.{fn}: {arg} must hold ints, got bool")
            try:
                t = operator.index(t)
            except TypeError:
                raise TypeError(f"KVCacheManager.{fn}: {arg} must hold ints, got {type(t).__name__}") from None
            if not -(2**63) <= t < 2**63:
                raise ValueError(f"KVCacheManager.{fn}: {arg} holds {t}, outside int64")
            out.append(t)
        return out
