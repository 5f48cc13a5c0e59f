"""Random memory-bank cases and an independent dense formulation of memory attention.

Cases are built the hard way: shuffled page ids from a pool larger than needed, NaN in every slot
that holds no live key (unused pages, the tail of each row's last page) and in the block-table
entries of evicted blocks (-1: the op must read them through ``bank_table``), ragged rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class MemoryCase:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor  # evicted entries -1
    full_table: torch.Tensor  # every block of every row (for full-attention comparisons)
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    sink_blocks: int
    window_start: torch.Tensor
    bank_table: torch.Tensor
    bank_lens: torch.Tensor
    selected: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    @property
    def max_seqlen_q(self) -> int:
        return int((self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).max())

    @property
    def max_seqlen_k(self) -> int:
        return int(self.seq_lens.max())

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.cu_seqlens_q,
                self.max_seqlen_q, self.max_seqlen_k)

    def memory_kwargs(self) -> dict:
        return dict(sink_blocks=self.sink_blocks, window_start=self.window_start, bank_table=self.bank_table,
                    selected=self.selected, **self.kwargs)


def rope_table(num_positions: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[num_positions, rot_dim]`` fp32: cos half then sin half."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def make_memory_case(
    q_lens: List[int],
    kv_lens: List[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    sink_blocks: int = 1,
    window: int = 32,
    top_k: int = 2,
    select_all: bool = False,
    extra_bank: int = 0,
    dtype: torch.dtype = torch.float32,
    rope_rot_dim: Optional[int] = None,
    softcap: Optional[float] = None,
    sink_logits: bool = False,
    kv_scale: bool = False,
    seed: int = 0,
) -> MemoryCase:
    """One step of a batch; row b had ``kv_lens[b] - q_lens[b]`` keys before it.

    ``window_start = max(sink_blocks, (L_start - window) // block_size)``; each row's bank is its
    evicted blocks ``[sink_blocks, window_start)`` then ``extra_bank`` attached pages of random
    keys; each (row, KV head) selects a random ``min(top_k, bank_len)`` subset (all with
    ``select_all``).
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(kv_lens)
    need = [-(-k // block_size) for k in kv_lens]
    num_blocks = sum(need) + extra_bank * batch + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype)
    v_cache = torch.full(shape, math.nan, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 1
    full_table = torch.full((batch, width), -1, dtype=torch.int32)
    block_table = full_table.clone()
    starts, banks = [], []
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        w0 = max(sink_blocks, (kv_len - q_len - window) // block_size)
        starts.append(w0)
        for i in range(need[b]):
            page = perm.pop()
            n = min(block_size, kv_len - i * block_size)
            k_cache[page, :n] = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[page, :n] = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
            full_table[b, i] = page
            if not sink_blocks <= i < w0:
                block_table[b, i] = page
        bank = full_table[b, sink_blocks:max(sink_blocks, w0)].tolist()
        if w0 * block_size <= kv_len - q_len:  # attached pages only when every query is in the window
            for _ in range(extra_bank):
                page = perm.pop()
                k_cache[page] = torch.randn(block_size, num_kv_heads, head_dim, generator=g).to(dtype)
                v_cache[page] = torch.randn(block_size, num_kv_heads, head_dim, generator=g).to(dtype)
                bank.append(page)
        banks.append(bank)
    max_bank = max(len(x) for x in banks) + 1
    bank_table = torch.full((batch, max_bank), -1, dtype=torch.int32)
    selected = torch.full((batch, num_kv_heads, top_k), -1, dtype=torch.int32)
    for b, bank in enumerate(banks):
        bank_table[b, :len(bank)] = torch.tensor(bank, dtype=torch.int32)
        n_sel = min(top_k, len(bank))
        for h in range(num_kv_heads):
            chosen = range(n_sel) if select_all else torch.randperm(len(bank), generator=g)[:n_sel].tolist()
            selected[b, h, :n_sel] = torch.tensor(sorted(chosen), dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    kwargs = {}
    if rope_rot_dim is not None:
        kwargs["rope_cos_sin"] = rope_table(max(kv_lens) + top_k * block_size + extra_bank * block_size + 1, rope_rot_dim)
    if softcap is not None:
        kwargs["softcap"] = softcap
    if sink_logits:
        kwargs["sink_logits"] = torch.randn(num_heads, generator=g)
    if kv_scale:
        kwargs["k_scale"] = (torch.rand(num_kv_heads, generator=g) + 0.5)
        kwargs["v_scale"] = torch.tensor(0.75)
    return MemoryCase(q, k_cache, v_cache, block_table, full_table, torch.tensor(kv_lens, dtype=torch.int32), cu,
                      sink_blocks, torch.tensor(starts, dtype=torch.int32), bank_table,
                      torch.tensor([len(x) for x in banks], dtype=torch.int32), selected, kwargs)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """RoPE written independently of kvmem: complex multiplication. x: [n, D] fp64, positions: [n]."""
    rot = cos_sin.shape[1]
    cos, sin = cos_sin.double()[positions].chunk(2, dim=-1)
    rotor = torch.complex(cos, sin)
    head = x[:, :rot]
    if neox:
        pairs = torch.complex(head[:, : rot // 2], head[:, rot // 2:]) * rotor
        rotated = torch.cat([pairs.real, pairs.imag], dim=-1)
    else:
        pairs = torch.complex(head[:, 0::2], head[:, 1::2]) * rotor
        rotated = torch.stack([pairs.real, pairs.imag], dim=-1).flatten(-2)
    return torch.cat([rotated, x[:, rot:]], dim=-1)


def dense_memory_attention(case: MemoryCase, rope_neox: bool = True):
    """Gather each (row, query head)'s keys explicitly, rotate them at their compacted positions
    (computed here from the definition), one dense masked softmax in fp64.

    Returns out [T, Hq, D] fp64, lse [T, Hq] fp64, block_mass [B, Hkv, max_bank] fp64 and the
    mass of the sinks + window + sink logit, [T, Hq] fp64.
    """
    q, kc, vc = case.q.double(), case.k_cache.double(), case.v_cache.double()
    num_tokens, num_heads, head_dim = q.shape
    bs, num_kv_heads = kc.shape[1], kc.shape[2]
    group = num_heads // num_kv_heads
    kw = case.kwargs
    scale = kw.get("scale", 1.0 / math.sqrt(head_dim))
    ks = kw.get("k_scale")
    vs = kw.get("v_scale")
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((num_tokens, num_heads), -math.inf, dtype=torch.float64)
    mass = torch.zeros(case.bank_table.shape[0], num_kv_heads, case.bank_table.shape[1], dtype=torch.float64)
    rest = torch.zeros(num_tokens, num_heads, dtype=torch.float64)
    S = case.sink_blocks * bs
    for b in range(case.seq_lens.shape[0]):
        L, lo, hi = int(case.seq_lens[b]), int(case.cu_seqlens_q[b]), int(case.cu_seqlens_q[b + 1])
        w0 = int(case.window_start[b])
        q_pos = torch.arange(L - (hi - lo), L)
        for h in range(num_kv_heads):
            sel = [int(i) for i in case.selected[b, h] if i >= 0]
            n_sel = len(sel)
            slots, orig, compact, bank_pos = [], [], [], []  # (page, offset), original pos, compacted pos
            for j in list(range(min(S, L))) + list(range(w0 * bs, L)):
                slots.append((int(case.full_table[b, j // bs]), j % bs))
                orig.append(j)
                compact.append(j if j < S else j - w0 * bs + S + n_sel * bs)
                bank_pos.append(-1)
            for i, pos in enumerate(sel):
                for o in range(bs):
                    slots.append((int(case.bank_table[b, pos]), o))
                    orig.append(-1)  # before every query
                    compact.append(S + i * bs + o)
                    bank_pos.append(pos)
            if not slots:
                continue
            pages = torch.tensor([s[0] for s in slots])
            offsets = torch.tensor([s[1] for s in slots])
            k = kc[pages, offsets, h]
            v = vc[pages, offsets, h]
            if ks is not None:
                k = k * (ks[h].double() if ks.dim() else ks.double())
                v = v * (vs[h].double() if vs.dim() else vs.double())
            if "rope_cos_sin" in kw:
                k = _rotate(k, torch.tensor(compact), kw["rope_cos_sin"], rope_neox)
            orig_t, bank_t = torch.tensor(orig), torch.tensor(bank_pos)
            for hq in range(h * group, (h + 1) * group):
                s = q[lo:hi, hq] @ k.T * scale  # [q_len, n]
                if "softcap" in kw:
                    s = kw["softcap"] * torch.tanh(s / kw["softcap"])
                s = s.masked_fill(orig_t[None] > q_pos[:, None], -math.inf)
                logits = s
                if "sink_logits" in kw:
                    logits = torch.cat([s, kw["sink_logits"][hq].double().expand(hi - lo, 1)], dim=-1)
                row_lse = torch.logsumexp(logits, dim=-1)
                p = torch.exp(s - row_lse[:, None]).nan_to_num(0.0)
                out[lo:hi, hq] = p @ v
                lse[lo:hi, hq] = row_lse
                in_bank = bank_t >= 0
                rest[lo:hi, hq] = 1.0 - p[:, in_bank].sum(-1)
                for pos in sel:
                    mass[b, h, pos] += p[:, bank_t == pos].sum()
    return out, lse, mass, rest


def memory_backends(op: str) -> list:
    """The backends the memory tests force (``KVMEM_BACKEND``) for ``op`` on this machine: the
    reference, the C++ CPU kernel (or composite) when the extension is built, Triton under the interpreter
    (forced on CPU tensors with ``TRITON_INTERPRET=1``, as tests/conftest.py sets it without a GPU)."""
    import os

    from kvmem import _ext, dispatch

    names = ["reference"]
    cpu = dispatch.capability(op, "cpu")
    if cpu is not None and _ext.has_kernel(cpu.kernel_op, "cpu"):
        names.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


def force_backend(monkeypatch, name: str) -> None:
    """``KVMEM_BACKEND=name`` for one test (the dispatcher's cached choices cleared)."""
    from kvmem import dispatch

    monkeypatch.setenv("KVMEM_BACKEND", name)
    dispatch._select.cache_clear()


def rejection(op: str, backend: str, call) -> Optional[str]:
    """Why ``backend``'s record of ``op`` rejects ``call`` (None when it runs it)."""
    from kvmem import dispatch

    why = dispatch.BY_NAME[backend].rejects(call)
    return None if why is None else why[1]
