"""Row operations of ``PagedKVCache``: prefix reuse, ``crop``, beam-search reordering.

Beam search (``reorder_cache``), ``batch_select_indices`` and ``batch_repeat_interleave`` permute
rows with ``KVCacheManager.fork`` / ``free_sequence``: rows share blocks, and the first write into a
shared, partly filled block copies it (copy-on-write). ``crop`` (assisted decoding) truncates every
row.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

__all__ = []


class _RowOps:
    """Mixin of ``PagedKVCache``: operations on its rows (the state is the cache's)."""

    def reuse_prefix(self, rows_tokens: List[List[int]], pads: Optional[List[int]] = None, *,
                     namespace: Union[None, bytes, str] = None) -> int:
        """Start the rows from cached blocks of their prompts (before the first step).

        Parameters
        ----------
        rows_tokens: per row, the prompt's real token ids (padding excluded)
        pads: per row, how many padding columns precede them (left padding), default 0
        namespace: the seed of the rows' block hash chains (``KVCacheManager.add_sequence``), e.g. the
            model's ``kvmem.model_fingerprint``: only blocks cached under the same namespace are
            reused, even in a pool another model shares; default the pool's own seed

        Returns
        -------
        the number of leading columns now cached for every row (``get_seq_length()``); generate()
        then feeds only the rest of the prompt. Each row's prompt blocks are registered for reuse
        when the step that fills them is planned; rows of the batch sharing full prompt blocks
        hold them once (``kvmem.cache.prefix``).
        """
        if self._seq_ids or self._seen or self._step is not None:
            raise RuntimeError("kvmem: reuse_prefix must be called on an empty PagedKVCache")
        if self._manager is None:
            raise RuntimeError("kvmem: reuse_prefix needs allocated pools (a KVPool)")
        pads = [0] * len(rows_tokens) if pads is None else list(pads)
        m = self._manager
        cached = []
        for toks in rows_tokens:
            sid = next(self._ids)
            cached.append(m.add_sequence(sid, [int(t) for t in toks], namespace=namespace))
            self._seq_ids.append(sid)
        while True:  # every row must hold exactly (cols - its padding) tokens
            cols = min(p + c for p, c in zip(pads, cached)) if cached else 0
            if cols < max(pads, default=0):  # a row's padding would have to be cached: no reuse
                cols = 0
            settled = True
            for i, (sid, p, toks) in enumerate(zip(self._seq_ids, pads, rows_tokens)):
                keep = max(0, cols - p)
                if cached[i] <= keep:
                    continue
                try:
                    m.truncate(sid, keep)
                    m.register_tokens(sid, [int(t) for t in toks])  # the prompt's ids stay known (its blocks' hashes)
                    cached[i] = keep
                except ValueError:  # a sliding group already dropped what a query at `keep` sees
                    m.free_sequence(sid)
                    cached[i] = m.add_sequence(sid, [int(t) for t in toks[: keep + 1]], namespace=namespace)
                    settled &= cached[i] == keep
            if settled:
                break
        self._seen = cols
        self._rows_permuted = False
        return cols

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row (a positive value is the new
        absolute length, transformers' legacy convention)."""
        self._finish_step()
        self._no_bank("crop")
        n = int(tokens_to_remove)
        if n > 0:
            n = -(self._seen - n) if n < self._seen else 0
        if n == 0:
            return
        n = -n
        if n > self._seen:
            raise ValueError(f"kvmem: cannot crop {n} tokens from a cache of {self._seen}")
        m = self._manager
        lens = [m.seq_len(s) for s in self._seq_ids]
        if any(L < n for L in lens):
            raise ValueError(f"kvmem: cannot crop {n} tokens: a row holds only {min(lens)} (padding is not stored)")
        for s, L in zip(self._seq_ids, lens):
            m.truncate(s, L - n)
        self._seen -= n

    def _no_bank(self, what: str) -> None:
        if getattr(self, "_bank", None) is not None:
            raise ValueError(f"kvmem: {what} is not supported with memory_bank yet (each row's bank follows "
                             f"its own evictions); use greedy or sampled decoding")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``r`` becomes old row ``beam_idx[r]`` (blocks shared, copy-on-write)."""
        self._reindex([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex([r for r in range(len(self._seq_ids)) for _ in range(int(repeats))])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._reindex([int(i) for i in idx.tolist()])

    def _reindex(self, rows: List[int]) -> None:
        """New row ``r`` = old row ``rows[r]`` (fork, then free the old rows)."""
        self._finish_step()
        old = self._seq_ids
        if not old:
            if rows:
                raise ValueError("kvmem: cannot reorder an empty PagedKVCache")
            return
        if any(not 0 <= r < len(old) for r in rows):
            raise IndexError(f"kvmem: row index out of range for a batch of {len(old)}: {rows}")
        if rows == list(range(len(old))):
            return
        self._no_bank("reordering rows (beam search, batch_select_indices, batch_repeat_interleave)")
        m = self._manager
        new = []
        for r in rows:
            sid = next(self._ids)
            m.fork(old[r], sid)
            new.append(sid)
        for s in old:
            m.free_sequence(s)
        self._seq_ids = new
        self._rows_permuted = True  # beam search: rows no longer match generate()'s output rows
