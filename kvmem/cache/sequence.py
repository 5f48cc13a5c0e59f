"""Per-sequence bookkeeping rows of ``KVCacheManager`` (block tables as growable numpy rows) and
the small argument helpers the manager's modules share."""

from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = []


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

    __slots__ = ("num_tokens", "tables", "num_dead", "token_ids", "hashes", "num_registered", "seed")

    def __init__(self, group_names):
        self.num_tokens = 0
        self.tables: Dict[str, _BlockRow] = {g: _BlockRow() for g in group_names}
        self.num_dead: Dict[str, int] = {g: 0 for g in group_names}
        # Known token ids (at least num_tokens of them), or None once they are unknown.
        self.token_ids: Optional[List[int]] = []
        self.hashes: List[bytes] = []  # chain hashes of known full blocks
        self.num_registered = 0  # blocks [0, num_registered) were offered to the prefix cache
        self.seed: Optional[bytes] = None  # the parent of the first block's chain hash (the namespace)

    def clone(self) -> "_Seq":
        s = _Seq(())
        s.num_tokens = self.num_tokens
        s.tables = {g: t.copy() for g, t in self.tables.items()}
        s.num_dead = dict(self.num_dead)
        s.token_ids = None if self.token_ids is None else list(self.token_ids)
        s.hashes = list(self.hashes)
        s.num_registered = self.num_registered
        s.seed = self.seed
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
