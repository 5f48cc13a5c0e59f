"""Prefix reuse of ``KVCacheManager`` beyond one call's prompts: answers, namespaces, batch dedup, growth.

* **Namespaces.** A sequence's hash chain starts from a seed (``add_sequence(namespace=)``, default the
  manager's ``hash_seed``): ``h_0 = H(seed, block 0)``. Two sequences whose seeds differ (two models,
  two KV formats: ``kvmem.model_fingerprint``) never share a hash, so they never share a block, even
  in one manager.
* **Answers.** Decode steps carry no token ids, so the blocks they fill are not hashed at plan
  time. ``register_tokens(seq_id, token_ids)`` gives the ids of a sequence's whole KV afterwards
  (``generate()``'s output): its full blocks are hashed in chain and registered, so a later
  sequence whose prompt contains them (a chat's next turn) starts from them.
* **Within a batch** (``_step_dedup``, used by ``plan``): a new block that this step fills
  completely, with known token ids, whose chain hash already names a block -- cached by an earlier
  call, or allocated this step by an earlier row of the batch -- is not allocated: the row points at
  that block (one more reference) and its tokens of that block get slot -1 (nothing written; the
  step's ``cache_write`` of the other row fills the page before any attention reads it). Rows
  sharing a prompt prefix therefore hold it once and their block tables start with the same page
  ids. Only full blocks are shared; a row that diverges inside a block has its own block from there
  (a later write into a shared, partly filled block copies it first: copy-on-write).
* **Growth.** ``grow(num_blocks)`` adds blocks; ids, refcounts and hashes stay (``KVPool.grow``
  copies the pages into larger pools), so an auto-sized pool can grow without dropping its cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

from kvmem.cache.allocator import block_hashes
from kvmem.cache.sequence import _cdiv, _int_arg, _Seq

__all__ = []


def _seed_arg(seed, fn: str, arg: str = "namespace") -> Optional[bytes]:
    if isinstance(seed, str):
        return seed.encode()
    if seed is not None and not isinstance(seed, bytes):
        raise TypeError(f"KVCacheManager.{fn}: {arg} must be None, bytes or a str, got {type(seed).__name__}")
    return seed


class _PrefixOps:
    """Mixin of ``KVCacheManager``: answer registration, growth and the batch dedup of a step."""

    def register_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Register the full blocks of ``seq_id``'s KV under the chain hashes of ``token_ids``.

        Parameters
        ----------
        seq_id: an existing sequence
        token_ids: [>= seq_len] the ids of the sequence's tokens from position 0 (e.g. prompt +
            generated tokens from ``generate()``'s output); ids past ``seq_len`` are the tokens the
            next steps will feed (their blocks are registered as those steps fill them): pass only
            ``seq_len`` ids when the next tokens are not known

        Returns
        -------
        the number of blocks newly registered (a block whose hash already names another block, e.g.
        the same answer in another row, stays unregistered: the first registration wins)

        Raises
        ------
        ValueError
            if fewer than ``seq_len`` ids are given, or they differ from the tokens the sequence's
            blocks were hashed from (nothing is changed then).
        """
        seq = self._get(seq_id, "register_tokens")
        toks = self._tokens_arg(token_ids, "register_tokens", "token_ids")
        L, bs = seq.num_tokens, self._block_size
        if len(toks) < L:
            raise ValueError(f"KVCacheManager.register_tokens: sequence {seq_id!r} holds {L} tokens, got "
                             f"{len(toks)} token ids (expected >= {L})")
        hashes = block_hashes(toks, bs, seq.seed)
        known = min(len(seq.hashes), len(hashes))
        if hashes[:known] != seq.hashes[:known]:
            raise ValueError(f"KVCacheManager.register_tokens: token_ids differ from the tokens sequence "
                             f"{seq_id!r}'s blocks were hashed from")
        seq.token_ids, seq.hashes = toks, hashes
        full, new, counted = L // bs, 0, next(iter(self._allocators))
        for g, a in self._allocators.items():
            table = seq.tables[g]
            for i in range(seq.num_registered, full):
                if table[i] >= 0 and a.block_hash(table[i]) is None and a.register(table[i], hashes[i]):
                    new += g == counted
        seq.num_registered = max(seq.num_registered, full)
        return new

    def grow(self, num_blocks: Union[int, Mapping]) -> None:
        """Grow every group (or the groups of a mapping) to ``num_blocks`` blocks, keeping every
        block's id, refcount and hash. Grow the pools' tensors to match (``KVPool.grow`` does both).

        Raises
        ------
        ValueError
            if a group would shrink, or the mapping names an unknown group (nothing is changed then).
        """
        want = {}
        for g, a in self._allocators.items():
            if isinstance(num_blocks, Mapping) and g not in num_blocks:
                continue
            n = num_blocks[g] if isinstance(num_blocks, Mapping) else num_blocks
            n = _int_arg(n, "grow", f"num_blocks[{g!r}]", a.num_blocks)
            want[g] = n
        if isinstance(num_blocks, Mapping):
            for g in num_blocks:
                self._check_group(g)
        for g, n in want.items():
            self._allocators[g].grow(n)

    def shared_blocks(self, seq_ids: Sequence[Hashable], group: str) -> int:
        """How many distinct blocks of ``group`` at least two of ``seq_ids`` reference."""
        count: Dict[int, int] = {}
        for s in seq_ids:
            for b in set(self._get(s, "shared_blocks").tables[self._check_group(group)].tolist()):
                if b >= 0:
                    count[b] = count.get(b, 0) + 1
        return sum(c > 1 for c in count.values())

    # --------------------------------------------------------------- internals
    def _new_full_blocks(self, seq: _Seq, n: int, extra: Optional[List[int]]) -> List[Tuple[int, bytes]]:
        """(block index, chain hash) of the new blocks this step fills completely, token ids known."""
        if extra is None or seq.token_ids is None or n == 0:
            return []
        bs, L = self._block_size, seq.num_tokens
        lo, hi = _cdiv(L, bs), min(L + n, len(seq.token_ids) + len(extra)) // bs
        if hi <= lo:
            return []
        hashes = seq.hashes
        if len(hashes) < hi:
            toks = seq.token_ids + extra
            parent = hashes[-1] if hashes else seq.seed
            hashes = hashes + block_hashes(toks[: hi * bs], bs, parent, len(hashes))
        return [(i, hashes[i]) for i in range(lo, hi)]

    def _step_dedup(self, a, cands, sim: Dict[int, int]) -> Tuple[Dict[tuple, tuple], int]:
        """The batch dedup of one group (see the module docstring): ``(row, block index) ->
        ("old", block) | ("new", (first row, block index))`` and how many free blocks the "old"
        hits take (cached free blocks taken back; ``sim`` holds the simulated refcounts)."""
        hits: Dict[tuple, tuple] = {}
        first: Dict[bytes, tuple] = {}
        taken = 0
        refcounts = a._refcounts  # read-only fast path (same package)
        for r, cand in enumerate(cands):
            for i, h in cand:
                b = a.lookup(h)
                if b is not None:
                    rc = sim.get(b, refcounts[b])
                    taken += rc == 0
                    sim[b] = rc + 1
                    hits[(r, i)] = ("old", b)
                elif h in first:
                    hits[(r, i)] = ("new", first[h])
                else:
                    first[h] = (r, i)
        return hits, taken

    @staticmethod
    def _extend_table(a, table, r: int, start: int, end: int, hits, assigned) -> None:
        """Give row ``r`` blocks ``start .. end - 1``: hits share, the rest are allocated."""
        nh = sum((r, i) in hits for i in range(start, end))
        fresh = iter(a.allocate(end - start - nh))
        blocks = []
        for i in range(start, end):
            hit = hits.get((r, i))
            if hit is None:
                b = next(fresh)
            elif hit[0] == "old":
                b = hit[1]  # increfed before any allocation (nothing can evict it)
            else:
                b = assigned[hit[1]]
                a.incref([b])
            assigned[(r, i)] = b
            blocks.append(b)
        table.extend(blocks)
