"""Named errors raised by kvmem.

Argument errors are plain ``TypeError`` / ``ValueError`` whose message names the function, the
argument and what was expected; only conditions a caller may want to catch and recover from get
their own class here.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["CacheFullError"]


class CacheFullError(RuntimeError):
    """The paged KV cache has too few free blocks for the requested step.

    Raised *before* anything is changed: the allocator, every block table and every page are
    exactly as they were, so the caller may shrink the batch (or free or preempt sequences) and
    try again.

    Attributes
    ----------
    blocks_needed: int
        Blocks the step would have had to allocate (in ``group``).
    blocks_free: int
        Blocks that were (or would have become) free for it.
    group: str or None
        The layer group that ran out, when the cache has layer groups.
    num_blocks: int or None
        The group's total number of blocks.
    """

    def __init__(
        self,
        blocks_needed: int,
        blocks_free: int,
        *,
        group: Optional[str] = None,
        num_blocks: Optional[int] = None,
    ):
        self.blocks_needed = int(blocks_needed)
        self.blocks_free = int(blocks_free)
        self.group = group
        self.num_blocks = num_blocks
        where = f"KV cache group {group!r}" if group is not None else "KV cache"
        total = f" (of {num_blocks})" if num_blocks is not None else ""
        if num_blocks is not None:
            larger = f"num_blocks={num_blocks + self.blocks_needed - self.blocks_free} or more"
        else:
            larger = "a larger num_blocks=..."
        super().__init__(
            f"{where} is full: the step needs {self.blocks_needed} free blocks but only "
            f"{self.blocks_free}{total} are free. Nothing was changed. Pass {larger} when creating "
            f"the cache (or give it more memory), or shrink the batch / free finished sequences."
        )

    def __reduce__(self):
        return (
            _rebuild_cache_full_error,
            (self.blocks_needed, self.blocks_free, self.group, self.num_blocks),
        )


def _rebuild_cache_full_error(blocks_needed, blocks_free, group, num_blocks):
    return CacheFullError(blocks_needed, blocks_free, group=group, num_blocks=num_blocks)
