"""The slot reservation of ``KVCacheManager``: check every group, then commit (see the manager's
module docstring: "Check, then commit", "Sliding windows", "Copy-on-write", "Prefix reuse")."""

from __future__ import annotations

from typing import Dict

from kvmem.cache.allocator import block_hashes
from kvmem.cache.sequence import _cdiv, _Seq
from kvmem.errors import CacheFullError

__all__ = []


class _Reservation:
    """Mixin of ``KVCacheManager``: the reservation of a step's slots (its state is the manager's)."""

    def _dead_blocks(self, group: str, first_query_pos: int) -> int:
        """Leading blocks no query at ``>= first_query_pos`` can see (0 for full attention)."""
        window = self._groups[group].window
        if window is None:
            return 0
        lo = max(0, first_query_pos - window + 1)  # visible_key_range's lower bound
        return lo // self._block_size

    def _reserve(self, seq_ids, nums, tok_lists, fn: str) -> Dict[str, list]:
        """Check, then commit, the slot reservation of a batch (see the module docstring).

        Returns group -> sorted ``(row, block index)`` of the new blocks shared instead of written
        (their tokens get slot -1, ``kvmem.cache.prefix``)."""
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
        # New blocks this step fills whose chain hash names a block are shared, not allocated
        # (kvmem.cache.prefix, "Within a batch").
        cands = [self._new_full_blocks(seq, n, extra) for seq, n, extra in zip(seqs, nums, new_known)]
        dedup = any(cands)
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
            hits, taken = self._step_dedup(a, cands, sim) if dedup else ({}, 0)
            avail -= taken
            need = -len(hits)
            cows = []
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
            plans[g] = (releases, cows, hits)
        # Commit.
        skips = {}
        for g, (releases, cows, hits) in plans.items():
            a = self._allocators[g]
            for seq, (idxs, dead) in zip(seqs, releases):
                if idxs:
                    table = seq.tables[g]
                    a.free([table[i] for i in idxs])
                    for i in idxs:
                        table[i] = -1
                seq.num_dead[g] = dead
            a.incref([h[1] for h in hits.values() if h[0] == "old"])  # before any allocation can evict them
            assigned = {}
            for r, (seq, n, cow) in enumerate(zip(seqs, nums, cows)):
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
                start, end = len(table), _cdiv(L + n, bs)
                if end > start and hits:
                    self._extend_table(a, table, r, start, end, hits, assigned)
                elif end > start:
                    table.extend(a.allocate(end - start))
            skips[g] = sorted(hits)
        for seq, n, extra in zip(seqs, nums, new_known):
            seq.num_tokens += n
            if extra is None:
                seq.token_ids = None
            else:
                seq.token_ids.extend(extra)
            self._register_full_blocks(seq)
        return skips

    def _register_full_blocks(self, seq: _Seq) -> None:
        if seq.token_ids is None:
            return
        bs = self._block_size
        full = min(seq.num_tokens, len(seq.token_ids)) // bs
        if full <= seq.num_registered:
            return
        if len(seq.hashes) < full:
            parent = seq.hashes[-1] if seq.hashes else seq.seed
            seq.hashes.extend(block_hashes(seq.token_ids[: full * bs], bs, parent, len(seq.hashes)))
        for g, a in self._allocators.items():
            table = seq.tables[g]
            for i in range(seq.num_registered, full):
                if table[i] >= 0:
                    a.register(table[i], seq.hashes[i])
        seq.num_registered = full
