"""Memory for model chains: answers reused next turn, a call's budget checked up front, the report.

A ``kvmem.patch(model, prefix_cache=True)`` model keeps its KV pool across ``generate()`` calls
(``kvmem.integrations.hf.generate.make_cache``). On top of the prompt blocks registered as the
prefill fills them (``kvmem.cache.manager``, "Prefix reuse"):

* **Answers** (``register_answers``): decode steps carry no token ids, so once a call returns, the
  ids it returns give each row's whole KV -- ``sequences[r, pad_r : pad_r + kv_len_r]`` (left
  padding is never stored; a row that stopped at EOS keeps being fed pad tokens, which are in its
  KV and in the ids alike; the last generated token was never fed). Its full blocks are hashed in
  chain and registered (``KVCacheManager.register_tokens``), so the next turn's prompt, which
  contains prompt + answer, starts from them. A re-templated history that tokenises differently
  stops matching at the first differing block: reuse stops there, correctly. Beam search
  reorders rows (``reorder_cache``): the returned sequences no longer name cache rows, so a beam
  call registers its prompt blocks only.
* **Budget** (``check_budget``): with a user budget (``num_blocks=`` / ``memory=``) the pool is
  never re-created; cached free blocks are evicted least recently used first as the call
  allocates. A call whose own need exceeds the whole budget -- every row's distinct full prompt
  blocks counted once plus its own blocks up to ``max_length - 1`` tokens (full-attention
  groups; sliding groups: the prefill) -- raises ``CacheFullError`` before anything changes (the
  previous call's cache is not even released). An accepted call never runs out of blocks.
* **A batch's shared prefix computed once** (``prepass_shared_prefix``): when every row of a call
  starts with the same full blocks that are not cached yet (a shared system prompt, beams,
  ``num_return_sequences``), a one-row pre-pass computes them once (the model's base, no LM head)
  and registers them; the call's rows then start from those blocks (``reuse_prefix``) and its
  prefill computes only what differs. The rows must share the prefix: generate() feeds one column
  range to every row, so a batch with one unrelated row gets no compute dedup (storage dedup
  still holds its shared blocks once, ``kvmem.cache.prefix``). Left padding: the rows start at
  ``min(pads) + prefix`` columns, so a row with more padding recomputes up to ``pad - min(pads)``
  of the prefix's last tokens (into a copy-on-write block). Skipped when it cannot pay or could
  change what a call may do: under a user budget that the call plus those copy-on-write blocks
  would exceed; with a sliding-window layer group and unequal padding (the window group no
  longer holds the blocks a more padded row starts from); on a float8 pool whose scales the
  first write would fix. An interrupted step (the pre-pass's or the call's) is rolled back when
  its cache is released, so no half-written block is ever reused.
* **Report** (``PrefixReport``, ``model._kvmem_prefix_report`` after each call).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from kvmem.cache.allocator import block_hashes
from kvmem.errors import CacheFullError

__all__ = ["PrefixReport", "register_answers", "check_budget", "call_need", "shared_prefix_len",
           "prepass_shared_prefix"]

logger = logging.getLogger("kvmem")


@dataclass
class PrefixReport:
    """What the prefix cache did for the latest ``generate()`` call (``model._kvmem_prefix_report``).

    Attributes
    ----------
    rows: the call's cache rows (prompts x ``num_return_sequences`` / beams)
    prompt_tokens: real (unpadded) prompt tokens over the rows
    reused_tokens: of those, the tokens the call's prefill did not compute: its rows started from
        cached blocks -- of earlier calls, or of this call's pre-pass (``prepass_tokens``). The
        prompt tokens computed are ``prompt_tokens - reused_tokens + prepass_tokens``
    reused_per_row: [rows] the same per row
    prepass_tokens: tokens of the batch's shared prefix that the one-row pre-pass computed once
        (``prepass_shared_prefix``); a row with more left padding than the least padded one reuses
        that many fewer of them (it starts inside the prefix)
    registered_tokens: tokens of the blocks registered once the call returned (its answers; 0 for
        beam search)
    shared_blocks: blocks of the full-attention group referenced by two rows or more (a prefix the
        batch stores once)
    kv_bytes_held: bytes of the blocks the call's cache holds when it returns
    blocks_cached: registered blocks in the pool (full group), in use or cached free
    """

    rows: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    reused_per_row: List[int] = field(default_factory=list)
    prepass_tokens: int = 0
    registered_tokens: int = 0
    shared_blocks: int = 0
    kv_bytes_held: int = 0
    blocks_cached: int = 0

    @property
    def reused_fraction(self) -> float:
        """``reused_tokens / prompt_tokens`` (0 without a prompt)."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def call_need(groups, block_size: int, rows_tokens: Sequence[Sequence[int]], pads: Sequence[int],
              max_cache_len: Optional[int]) -> Dict[str, int]:
    """Blocks per layer group one ``generate()`` call needs at most (see the module docstring).

    Parameters
    ----------
    rows_tokens: per row, the prompt's real token ids; pads: per row, its left padding
    max_cache_len: ``generate()``'s ``max_length`` (columns, padding included), or None (prefill only)
    """
    bs = block_size
    distinct = set()
    tails = grown = 0
    for toks, pad in zip(rows_tokens, pads):
        full = len(toks) // bs
        distinct.update(block_hashes(list(toks), bs))
        tails += -(-len(toks) // bs) - full
        kv = len(toks) if max_cache_len is None else max(len(toks), int(max_cache_len) - 1 - pad)
        grown += -(-kv // bs) - full
    return {g.name: len(distinct) + (tails if g.window is not None else grown) for g in groups}


def check_budget(groups, block_size: int, rows_tokens, pads, max_cache_len, budget: Dict[str, int]) -> Dict[str, int]:
    """Raise ``CacheFullError`` (nothing changed) if the call cannot fit in ``budget`` blocks; else
    return its need (``call_need``)."""
    need = call_need(groups, block_size, rows_tokens, pads, max_cache_len)
    for g, n in need.items():
        if n > budget.get(g, 0):
            raise CacheFullError(n, budget.get(g, 0), group=g, num_blocks=budget.get(g, 0))
    return need


def register_answers(cache, sequences: torch.Tensor, report: Optional[PrefixReport] = None) -> int:
    """Register the full blocks of every row's KV (prompt + answer) of a finished call's ``cache``.

    Parameters
    ----------
    cache: the call's ``PagedKVCache`` (made by ``make_cache``, still holding its rows)
    sequences: [rows, columns] the ids ``generate()`` returned
    report: updated in place (``registered_tokens``, ``shared_blocks``, ``kv_bytes_held``, ``blocks_cached``)

    Returns
    -------
    the number of tokens in newly registered blocks
    """
    m = cache.manager
    sids, pads = list(cache._seq_ids), getattr(cache, "_prompt_pads", None)
    new = 0
    ok = (m is not None and not cache._released and not getattr(cache, "_rows_permuted", False)
          and pads is not None and isinstance(sequences, torch.Tensor) and sequences.dim() == 2
          and sequences.shape[0] == len(sids) == len(pads))
    if ok:
        ids = sequences.detach().cpu()
        for r, (sid, pad) in enumerate(zip(sids, pads)):
            L = m.seq_len(sid)
            if pad + L > ids.shape[1]:
                continue
            try:
                new += m.register_tokens(sid, ids[r, pad: pad + L].tolist())
            except ValueError:  # not the tokens this row's blocks were hashed from: leave the row alone
                continue
    new *= cache.block_size
    if report is not None and m is not None:
        full = next((g.name for g in cache.groups if g.window is None), cache.groups[0].name)
        report.registered_tokens = new
        report.shared_blocks = m.shared_blocks(sids, full) if sids else 0
        report.kv_bytes_held = cache.kv_bytes_held()
        report.blocks_cached = m.allocator(full).num_cached
        logger.debug("kvmem prefix cache: %d/%d prompt tokens reused (%.1f%%), %d answer tokens registered, "
                     "%d shared blocks, %d KV bytes held", report.reused_tokens, report.prompt_tokens,
                     100 * report.reused_fraction, new, report.shared_blocks, report.kv_bytes_held)
    return new


def shared_prefix_len(rows_tokens: Sequence[Sequence[int]], pads: Sequence[int], block_size: int, *,
                      sliding: bool = False) -> int:
    """Tokens (whole blocks) that every row starts with and that a one-row pre-pass may compute for the
    batch: at most ``min(len) - 1`` (each row's last prompt token is computed by the call itself).
    0 for fewer than two rows, when the rows' padding differs by more than the prefix, and -- with a
    ``sliding`` window layer group -- when the padding differs at all (a row with more padding
    would start inside the prefix, where the window group no longer holds the blocks it needs, and
    recompute most of it)."""
    if len(rows_tokens) < 2 or not all(len(t) for t in rows_tokens):
        return 0
    if sliding and len(set(pads)) > 1:
        return 0
    n = min(len(t) for t in rows_tokens) - 1
    common = len(os.path.commonprefix([list(t[:n]) for t in rows_tokens]))
    L = common // block_size * block_size
    if not L or min(pads) + L < max(pads):  # a row's padding would have to be cached: no reuse
        return 0
    return L


def prepass_extra_blocks(pads: Sequence[int], block_size: int) -> int:
    """Blocks the rows need beyond ``call_need`` after a pre-pass: a row with more padding than the
    least padded one starts inside the prefix's last block and writes a copy-on-write copy of it."""
    lo = min(pads, default=0)
    return sum(1 for p in pads if (p - lo) % block_size)


def prepass_shared_prefix(model, pool, rows_tokens, pads, *, namespace, block_size: int, cache_kw: dict,
                          budget: Optional[Dict[str, int]] = None, need: Optional[Dict[str, int]] = None) -> int:
    """Compute the full blocks every row of a call starts with once, as a one-row prefill into ``pool``
    (their blocks registered under ``namespace``, then cached free for the call's ``reuse_prefix``).

    ``budget``: a user budget (blocks per group), with ``need`` the call's (``check_budget``): the
    pre-pass is skipped when that need plus
    the copy-on-write blocks it causes (``prepass_extra_blocks``) would not fit, so a call that
    fits without it still fits. Skipped too for a float8 pool whose scales the first write would
    fix (``kvmem.cache.scales``): they stay fixed by the whole batch's prompt, not by the prefix.
    Returns the tokens computed (0: nothing shared, already cached, or skipped).
    """
    from kvmem.integrations.hf.cache import PagedKVCache
    from kvmem.integrations.hf.compat import cache_kwarg

    groups = pool.groups
    L = shared_prefix_len(rows_tokens, pads, block_size, sliding=any(g.window is not None for g in groups))
    if not L:
        return 0
    if not _scales_fixed(pool):
        return 0
    if budget is not None:
        extra = prepass_extra_blocks(pads, block_size)
        if any(need.get(g.name, 0) + (extra if g.window is None else 0) > budget.get(g.name, 0) for g in groups):
            return 0
    prefix = [int(t) for t in rows_tokens[0][:L + 1]]  # + one token: reuse_prefix may then reach all L
    cache = PagedKVCache(model.config, pool=pool, max_cache_len=L + 1, **cache_kw)
    pool.live = cache
    try:
        cache._prompt_pads = [0]
        start = cache.reuse_prefix([prefix], [0], namespace=namespace)
        if start >= L:
            return 0
        base = model.base_model
        device = next(model.parameters()).device
        ids = torch.tensor([prefix[start:L]], device=device)
        with torch.no_grad():
            base(input_ids=ids, use_cache=True, **{cache_kwarg(base): cache})
    finally:
        cache.release()
        pool.live = None
    logger.debug("kvmem prefix cache: the batch's shared %d-token prefix computed once (%d rows)",
                 L - start, len(rows_tokens))
    return L - start


def _scales_fixed(pool) -> bool:
    """Whether every layer's float8 scales in ``pool`` are fixed already (given, or by an earlier write)."""
    scales = pool.scales
    return scales is None or all(scales.is_fixed(layer) for layer in range(pool.num_layers))
