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
  longest cached prefix back instead of allocating it.
"""

from __future__ import annotations

import operator
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kvmem.cache.allocator import BlockAllocator, block_hashes
from kvmem.cache.metadata import GroupUsage, LayerGroupSpec, StepMetadata, StepPlan
from kvmem.errors import CacheFullError

__all__ = ["KVCacheManager"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _int_arg(x, fn: str, arg: str, minimum: Optional[int] = None) -> int:
    if isinstance(x, bool):
        raise TypeError(f"KVCacheManager.{fn}: {arg} must be an int, got bool")
    try:
        x = operator.index(x)
    except TypeError:
        raise TypeError(f"KVCacheManager.{fn}: {arg} must be an int, got {type(x).__name__}") from None
    if minimum is not None and x < minimum:
        raise ValueError(f"KVCacheManager.{fn}: {arg} must be >= {minimum}, got {x}")
    return x


class _BlockRow:
    """A growable int32 row of block ids (a sequence's block table in one group).

    Kept as numpy so ``plan()`` copies whole rows at memcpy speed instead of converting Python
    lists element by element every step.
    """

    __slots__ = ("buf", "n")

    def __init__(self, blocks: Sequence[int] = ()):
        self.buf = np.full(max(16, 2 * len(blocks)), -1, dtype=np.int32)
        self.n = len(blocks)
        self.buf[: self.n] = blocks

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return int(self.buf[i])

    def __setitem__(self, i: int, block: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.buf[i] = block

    def extend(self, blocks: Sequence[int]) -> None:
        k = len(blocks)
        if self.n + k > len(self.buf):
            grown = np.full(max(2 * len(self.buf), self.n + k), -1, dtype=np.int32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + k] = blocks
        self.n += k

    def truncate(self, n: int) -> None:
        self.buf[n : self.n] = -1
        self.n = min(self.n, n)

    def view(self) -> np.ndarray:
        return self.buf[: self.n]

    def live_reversed(self, start: int = 0) -> List[int]:
        """Held blocks (>= 0) at indices >= ``start``, last first."""
        v = self.buf[start : self.n]
        return v[v >= 0][::-1].tolist()

    def tolist(self) -> List[int]:
        return self.buf[: self.n].tolist()

    def copy(self) -> "_BlockRow":
        r = _BlockRow()
        r.buf, r.n = self.buf.copy(), self.n
        return r


class _Seq:
    """One sequence's state. ``tables[g]`` is ``[-1] * num_dead[g] + live blocks``."""

    __slots__ = ("num_tokens", "tables", "num_dead", "token_ids", "hashes", "num_registered")

    def __init__(self, group_names):
        self.num_tokens = 0
        self.tables: Dict[str, _BlockRow] = {g: _BlockRow() for g in group_names}
        self.num_dead: Dict[str, int] = {g: 0 for g in group_names}
        # Known token ids (at least num_tokens of them), or None once they are unknown.
        self.token_ids: Optional[List[int]] = []
        self.hashes: List[bytes] = []  # chain hashes of known full blocks
        self.num_registered = 0  # blocks [0, num_registered) were offered to the prefix cache

    def clone(self) -> "_Seq":
        s = _Seq(())
        s.num_tokens = self.num_tokens
        s.tables = {g: t.copy() for g, t in self.tables.items()}
        s.num_dead = dict(self.num_dead)
        s.token_ids = None if self.token_ids is None else list(self.token_ids)
        s.hashes = list(self.hashes)
        s.num_registered = self.num_registered
        return s

    def state(self) -> tuple:
        return (
            self.num_tokens,
            tuple(sorted((g, tuple(t.tolist())) for g, t in self.tables.items())),
            tuple(sorted(self.num_dead.items())),
            None if self.token_ids is None else tuple(self.token_ids),
            tuple(self.hashes),
            self.num_registered,
        )


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> tensor on ``device`` (one non-blocking copy from pinned memory for CUDA)."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class KVCacheManager:
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
    def add_sequence(self, seq_id: Hashable, token_ids: Optional[Sequence[int]] = None) -> int:
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
        """
        if seq_id in self._seqs:
            raise ValueError(f"KVCacheManager.add_sequence: sequence {seq_id!r} already exists")
        tokens = [] if token_ids is None else self._tokens_arg(token_ids, "add_sequence", "token_ids")
        bs = self._block_size
        seq = _Seq(self._groups)
        seq.token_ids = tokens
        seq.hashes = block_hashes(tokens, bs)
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
        pos = np.arange(seq.num_tokens, seq.num_tokens + n)
        self._reserve([seq_id], [n], [token_ids], "extend")
        bs = self._block_size
        return {
            g: (seq.tables[g].view()[pos // bs].astype(np.int64) * bs + pos % bs).tolist() for g in self._groups
        }

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

        self._reserve(seq_ids, nums, tok_lists, "plan")  # validates the rest, then commits

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

    def apply_copies(self, pools: Union[Mapping[int, object], Sequence[object]]) -> None:
        """Apply and clear the pending copy-on-write copies: ``pool[dst] = pool[src]``.

        Copies are applied in the order they were recorded (a batch of ``index_copy_`` per run of
        pairs without read-after-write or write-after-write hazards).

        Parameters
        ----------
        pools: layer index -> that layer's pools: a tensor or a tuple such as ``(k_cache, v_cache)``,
            each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any tensor whose dim 0 is the
            block); a mapping, or a sequence indexed by layer. Every layer of every group with
            pending copies must be present.
        """
        todo = {g: c for g, c in self.pending_copies.items() if c}
        if not todo:
            return
        work = []
        for g, pairs in todo.items():
            n = self._allocators[g].num_blocks
            for layer in self._groups[g].layers:
                try:
                    entry = pools[layer]
                except (KeyError, IndexError):
                    raise ValueError(f"KVCacheManager.apply_copies: no pools for layer {layer} (group {g!r})") from None
                tensors = (entry,) if isinstance(entry, torch.Tensor) else tuple(entry)
                for t in tensors:
                    if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] < n:
                        raise ValueError(
                            f"KVCacheManager.apply_copies: layer {layer}'s pools must be tensors with at least "
                            f"{n} blocks in dim 0 (group {g!r}), got {getattr(t, 'shape', type(t).__name__)}"
                        )
                work.extend((t, g) for t in tensors)
        chunks = {g: _hazard_free_runs(pairs) for g, pairs in todo.items()}
        index_cache: Dict[Tuple[str, torch.device], list] = {}
        for t, g in work:
            key = (g, t.device)
            if key not in index_cache:
                index_cache[key] = [
                    tuple(_upload(np.asarray(idx, dtype=np.int64), t.device) for idx in (src, dst))
                    for src, dst in chunks[g]
                ]
            for src, dst in index_cache[key]:
                t.index_copy_(0, dst, t.index_select(0, src))
        for g in todo:
            self.pending_copies[g] = []

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

    def make_pools(
        self,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: Union[None, str, torch.device, Mapping[int, Union[str, torch.device]]] = None,
        fill: Optional[float] = None,
        layers: Optional[Sequence[int]] = None,
    ) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """Allocate K/V pools for every layer (or ``layers``): layer -> (k_cache, v_cache).

        ``device`` is one device for all pools, or a mapping layer -> device (a model split over
        several GPUs keeps each layer's pools next to its weights); default: the manager's.

        Returns
        -------
        dict of layer -> two tensors [num_blocks of the layer's group, block_size, num_kv_heads, head_dim]
        """
        per_layer = isinstance(device, Mapping)
        one = self.device if device is None or per_layer else torch.device(device)
        pools = {}
        for layer, g in sorted(self._layer_to_group.items()):
            if layers is not None and layer not in layers:
                continue
            dev = torch.device(device.get(layer, one) or one) if per_layer else one
            shape = (self._allocators[g].num_blocks, self._block_size, num_kv_heads, head_dim)
            pair = tuple(
                torch.empty(shape, dtype=dtype, device=dev) if fill is None
                else torch.full(shape, fill, dtype=dtype, device=dev)
                for _ in range(2)
            )
            pools[layer] = pair
        return pools

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

    def _dead_blocks(self, group: str, first_query_pos: int) -> int:
        """Leading blocks no query at ``>= first_query_pos`` can see (0 for full attention)."""
        window = self._groups[group].window
        if window is None:
            return 0
        lo = max(0, first_query_pos - window + 1)  # visible_key_range's lower bound
        return lo // self._block_size

    def _reserve(self, seq_ids, nums, tok_lists, fn: str) -> None:
        """Check, then commit, the slot reservation of a batch (see the module docstring)."""
        bs = self._block_size
        seqs = [self._get(s, fn) for s in seq_ids]
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError(f"KVCacheManager.{fn}: a sequence appears twice in the batch")
        # Token bookkeeping (validated now, applied at commit).
        new_known = []
        for seq, n, tok in zip(seqs, nums, tok_lists):
            if tok is not None:
                tok = self._tokens_arg(tok, fn, "token_ids")
                if len(tok) != n:
                    raise ValueError(f"KVCacheManager.{fn}: got {len(tok)} token ids for {n} new tokens")
            known = seq.token_ids
            if known is None:
                new_known.append(None)
                continue
            overlap = known[seq.num_tokens : seq.num_tokens + n]
            if tok is not None:
                if tok[: len(overlap)] != overlap:
                    raise ValueError(
                        f"KVCacheManager.{fn}: token_ids differ from the sequence's known (prompt) tokens"
                    )
                new_known.append(tok[len(overlap) :])
            else:
                new_known.append([] if len(overlap) == n else None)
        # Simulate every group: releases (sliding window) first, then copy-on-write and new blocks.
        plans = {}
        for g, a in self._allocators.items():
            refcounts = a._refcounts  # read-only fast path (same package)
            sim: Dict[int, int] = {}
            avail = a.num_free
            releases = []
            for seq in seqs:
                table = seq.tables[g]
                dead = max(seq.num_dead[g], self._dead_blocks(g, seq.num_tokens))
                idxs = [i for i in range(seq.num_dead[g], dead) if table[i] >= 0]
                for i in idxs:
                    b = table[i]
                    sim[b] = sim.get(b, refcounts[b]) - 1
                    avail += sim[b] == 0
                releases.append((idxs, dead))
            cows, need = [], 0
            for seq, n in zip(seqs, nums):
                L, cow = seq.num_tokens, False
                if n > 0 and L % bs:
                    b = seq.tables[g][L // bs]
                    r = sim.get(b, refcounts[b])
                    if r > 1:
                        cow, sim[b] = True, r - 1
                cows.append(cow)
                need += cow + _cdiv(L + n, bs) - len(seq.tables[g])
            if need > avail:
                raise CacheFullError(need, avail, group=g, num_blocks=a.num_blocks)
            plans[g] = (releases, cows)
        # Commit.
        for g, (releases, cows) in plans.items():
            a = self._allocators[g]
            for seq, (idxs, dead) in zip(seqs, releases):
                if idxs:
                    table = seq.tables[g]
                    a.free([table[i] for i in idxs])
                    for i in idxs:
                        table[i] = -1
                seq.num_dead[g] = dead
            for seq, n, cow in zip(seqs, nums, cows):
                table, L = seq.tables[g], seq.num_tokens
                if n > 0 and L % bs:
                    i = L // bs
                    if cow:
                        (fresh,) = a.allocate(1)
                        self.pending_copies[g].append((table[i], fresh))
                        a.free([table[i]])
                        table[i] = fresh
                    elif a.block_hash(table[i]) is not None:
                        a.unregister(table[i])  # written in place: its old hash no longer holds
                grow = _cdiv(L + n, bs) - len(table)
                if grow:
                    table.extend(a.allocate(grow))
        for seq, n, extra in zip(seqs, nums, new_known):
            seq.num_tokens += n
            if extra is None:
                seq.token_ids = None
            else:
                seq.token_ids.extend(extra)
            self._register_full_blocks(seq)

    def _register_full_blocks(self, seq: _Seq) -> None:
        if seq.token_ids is None:
            return
        bs = self._block_size
        full = min(seq.num_tokens, len(seq.token_ids)) // bs
        if full <= seq.num_registered:
            return
        if len(seq.hashes) < full:
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes.extend(block_hashes(seq.token_ids[: full * bs], bs, parent, len(seq.hashes)))
        for g, a in self._allocators.items():
            table = seq.tables[g]
            for i in range(seq.num_registered, full):
                if table[i] >= 0:
                    a.register(table[i], seq.hashes[i])
        seq.num_registered = full


def _hazard_free_runs(pairs: Sequence[Tuple[int, int]]) -> List[Tuple[List[int], List[int]]]:
    """Split copy pairs into runs that one gather + scatter applies as if one by one."""
    runs, src, dst, written = [], [], [], set()
    for s, d in pairs:
        if s in written or d in written:  # read-after-write or write-after-write: new run
            runs.append((src, dst))
            src, dst, written = [], [], set()
        src.append(s)
        dst.append(d)
        written.add(d)
    if src:
        runs.append((src, dst))
    return runs
