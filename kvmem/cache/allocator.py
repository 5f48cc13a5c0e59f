"""Host-side block allocator: free list, refcounts and a prefix cache of full blocks.

A *block* (page) holds ``block_size`` consecutive tokens of one sequence in every layer of a layer
group. The allocator only hands out block ids and counts references; it never touches a page.

Prefix reuse
------------
A full block is identified by a hash chain: ``h_i = H(h_{i-1}, tokens of block i)`` (``h_{-1}`` is
empty), so equal hashes mean equal *whole prefixes*, not just equal blocks. The allocator keeps a map
``hash -> block`` of registered full blocks. A block whose refcount drops to 0 while registered is not
returned to the free list but parked in an LRU of *cached free* blocks: it counts as free, yet a new
sequence with the same prefix can take it back (``incref``) until allocation pressure evicts it
(least recently freed first, and only after the plain free list is empty).
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from kvmem.errors import CacheFullError

__all__ = ["BlockAllocator", "hash_block_tokens", "block_hashes"]

BlockHash = bytes


def _as_int(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(x).__name__}") from None


def hash_block_tokens(parent: Optional[BlockHash], tokens: Sequence[int]) -> BlockHash:
    """Chain hash of one full block: ``sha256(parent || int64 token ids)``.

    Parameters
    ----------
    parent: hash of the previous block of the sequence, or None for the first block
    tokens: [block_size] token ids (each must fit in int64)

    Returns
    -------
    32-byte digest
    """
    h = hashlib.sha256(parent if parent is not None else b"\x00")
    try:
        h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    except struct.error as e:
        raise ValueError(f"hash_block_tokens: token ids must be ints in int64 range ({e})") from None
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    parent: Optional[BlockHash] = None,
    start_block: int = 0,
) -> List[BlockHash]:
    """Chain hashes of the full blocks of ``token_ids``, from block ``start_block`` on.

    Parameters
    ----------
    token_ids: [num_tokens] token ids of the sequence from position 0
    block_size: tokens per block
    parent: hash of block ``start_block - 1`` (None when ``start_block == 0``)
    start_block: first block to hash

    Returns
    -------
    hashes of blocks ``start_block .. len(token_ids) // block_size - 1``; a trailing partial block
    has no hash.
    """
    out: List[BlockHash] = []
    for i in range(start_block, len(token_ids) // block_size):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


class BlockAllocator:
    """Free list + refcounts + prefix cache over ``num_blocks`` blocks of ``block_size`` tokens.

    Parameters
    ----------
    num_blocks: number of blocks (pages) in the pools this allocator manages
    block_size: tokens per block (only recorded; the allocator counts blocks)

    Notes
    -----
    Every method checks its arguments completely before changing anything, so a raised error
    leaves the allocator unchanged. The free list is LIFO (recently freed pages are likely still in
    cache); cached free blocks are evicted least-recently-freed first.
    """

    def __init__(self, num_blocks: int, block_size: int):
        num_blocks = _as_int(num_blocks, "BlockAllocator: num_blocks")
        block_size = _as_int(block_size, "BlockAllocator: block_size")
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator: num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"BlockAllocator: block_size must be >= 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._refcounts: List[int] = [0] * num_blocks
        # Plain free blocks, popped from the end: block 0 is handed out first.
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        # Registered blocks with refcount 0, oldest first (evicted first).
        self._cached_free: "OrderedDict[int, None]" = OrderedDict()
        self._hash_to_block: Dict[BlockHash, int] = {}
        self._block_to_hash: Dict[int, BlockHash] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        """Total number of blocks."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out (plain free + cached free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        """Blocks with refcount > 0."""
        return self._num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered (hashed) blocks, in use or cached free."""
        return len(self._block_to_hash)

    @property
    def num_cached_free(self) -> int:
        """Registered blocks with refcount 0 (reusable by prefix, evictable)."""
        return len(self._cached_free)

    def refcount(self, block: int) -> int:
        """Number of references to ``block`` (0 when free)."""
        return self._refcounts[self._check_block(block, "refcount")]

    def block_hash(self, block: int) -> Optional[BlockHash]:
        """The hash ``block`` is registered under, or None."""
        return self._block_to_hash.get(self._check_block(block, "block_hash"))

    def lookup(self, block_hash: BlockHash) -> Optional[int]:
        """The block registered under ``block_hash`` (in use or cached free), or None."""
        return self._hash_to_block.get(block_hash)

    def match_prefix(self, hashes: Iterable[BlockHash]) -> List[int]:
        """Blocks of the longest prefix of ``hashes`` that is registered (no refcount change)."""
        out = []
        for h in hashes:
            b = self._hash_to_block.get(h)
            if b is None:
                break
            out.append(b)
        return out

    # ---------------------------------------------------------------- mutations
    def allocate(self, n: int) -> List[int]:
        """Take ``n`` blocks (refcount 1 each).

        Plain free blocks go first; then cached free blocks are evicted, least recently freed first
        (their hashes are dropped).

        Raises
        ------
        CacheFullError
            if fewer than ``n`` blocks are free; nothing is changed then.
        """
        n = _as_int(n, "BlockAllocator.allocate: n")
        if n < 0:
            raise ValueError(f"BlockAllocator.allocate: n must be >= 0, got {n}")
        if n > self.num_free:
            raise CacheFullError(n, self.num_free, num_blocks=self._num_blocks)
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._cached_free.popitem(last=False)
                del self._hash_to_block[self._block_to_hash.pop(b)]
            self._refcounts[b] = 1
            out.append(b)
        return out

    def incref(self, blocks: Iterable[int]) -> None:
        """Add one reference to each block (a block listed twice gets two).

        A block with refcount 0 may be increfed only while it is cached (registered): that is how
        prefix reuse takes a cached free block back.

        Raises
        ------
        ValueError
            if a block is out of range, or free and not cached.
        """
        blocks = [self._check_block(b, "incref") for b in blocks]
        for b in blocks:
            if self._refcounts[b] == 0 and b not in self._cached_free:
                raise ValueError(
                    f"BlockAllocator.incref: block {b} is free (refcount 0) and not cached; "
                    f"allocate() blocks instead of increfing free ones"
                )
        for b in blocks:
            if self._refcounts[b] == 0:
                del self._cached_free[b]
            self._refcounts[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; a block reaching 0 becomes free.

        A registered block reaching 0 goes to the cached-free LRU (most recent end) and keeps its
        hash; others return to the free list.

        Raises
        ------
        ValueError
            on a double free (dropping more references than a block holds), naming the block;
            nothing is changed then.
        """
        blocks = [self._check_block(b, "free") for b in blocks]
        drops: Dict[int, int] = {}
        for b in blocks:
            drops[b] = drops.get(b, 0) + 1
        for b, d in drops.items():
            if d > self._refcounts[b]:
                raise ValueError(
                    f"BlockAllocator.free: double free of block {b} (refcount "
                    f"{self._refcounts[b]}, freed {d} time(s))"
                )
        for b in blocks:
            self._refcounts[b] -= 1
            if self._refcounts[b] == 0:
                if b in self._block_to_hash:
                    self._cached_free[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, block_hash: BlockHash) -> bool:
        """Record that in-use ``block`` is a full block whose chain hash is ``block_hash``.

        Returns False (and changes nothing) when the hash already names a block or the block already
        has a hash: the first registration wins.

        Raises
        ------
        ValueError
            if ``block`` is free.
        """
        block = self._check_block(block, "register")
        if self._refcounts[block] == 0:
            raise ValueError(f"BlockAllocator.register: block {block} is free; only in-use blocks are registered")
        if block_hash in self._hash_to_block or block in self._block_to_hash:
            return False
        self._hash_to_block[block_hash] = block
        self._block_to_hash[block] = block_hash
        return True

    def unregister(self, block: int) -> None:
        """Forget ``block``'s hash (before its contents change); a cached free block becomes plain free."""
        block = self._check_block(block, "unregister")
        h = self._block_to_hash.pop(block, None)
        if h is None:
            return
        del self._hash_to_block[h]
        if block in self._cached_free:
            del self._cached_free[block]
            self._free.append(block)

    def grow(self, num_blocks: int) -> None:
        """Add blocks ``self.num_blocks .. num_blocks - 1`` (plain free); every existing block keeps
        its id, refcount and hash, so block tables and the prefix cache stay valid (the caller grows
        the pools to match, ``KVPool.grow``).

        Raises
        ------
        ValueError
            if ``num_blocks`` is smaller than the current number of blocks.
        """
        num_blocks = _as_int(num_blocks, "BlockAllocator.grow: num_blocks")
        if num_blocks < self._num_blocks:
            raise ValueError(f"BlockAllocator.grow: num_blocks must be >= the current {self._num_blocks}, "
                             f"got {num_blocks}")
        self._refcounts.extend([0] * (num_blocks - self._num_blocks))
        self._free[:0] = range(num_blocks - 1, self._num_blocks - 1, -1)  # old free blocks are taken first
        self._num_blocks = num_blocks

    def reset_prefix_cache(self) -> None:
        """Forget every hash; cached free blocks become plain free."""
        for b in list(self._cached_free):
            self._free.append(b)
        self._cached_free.clear()
        self._hash_to_block.clear()
        self._block_to_hash.clear()

    # ------------------------------------------------------------------ helpers
    def debug_state(self) -> dict:
        """A deep, comparable snapshot of the whole state (for tests and debugging)."""
        return {
            "refcounts": tuple(self._refcounts),
            "free": tuple(self._free),
            "cached_free": tuple(self._cached_free),
            "hashes": tuple(sorted(self._block_to_hash.items())),
        }

    def check_invariants(self) -> None:
        """Assert internal consistency (used by the tests)."""
        free = set(self._free)
        cached = set(self._cached_free)
        assert len(free) == len(self._free), "duplicate block in free list"
        assert not free & cached, "block both plain free and cached free"
        for b in range(self._num_blocks):
            rc = self._refcounts[b]
            assert rc >= 0
            assert (rc == 0) == (b in free or b in cached), f"block {b}: refcount {rc} vs free lists"
        assert all(b in self._block_to_hash for b in cached)
        assert not free & set(self._block_to_hash), "plain free block has a hash"
        assert len(self._hash_to_block) == len(self._block_to_hash)
        for h, b in self._hash_to_block.items():
            assert self._block_to_hash[b] == h

    def _check_block(self, block, fn: str) -> int:
        block = _as_int(block, f"BlockAllocator.{fn}: block")
        if not 0 <= block < self._num_blocks:
            raise ValueError(f"BlockAllocator.{fn}: block {block} is out of range [0, {self._num_blocks})")
        return block

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(num_blocks={self._num_blocks}, block_size={self._block_size}, "
            f"free={self.num_free}, cached={self.num_cached})"
        )
