"""Launch configurations of the Triton paged-attention kernels: config lists, heuristics, the autotuning
cache, and the enumeration of every constexpr combination the launchers can choose (used by
``tools/aot_compile_triton.py``).

Autotuning is opt-in (``KVMEM_TRITON_AUTOTUNE=1``); by default the heuristic config (the first
of each list, or the small-query one for short prefills) is used, always under
``TRITON_INTERPRET=1``. Why not on by default:

* benchmarking synchronises the host (``do_bench``) on the first call of every new key, inside
  the decode loop that kvmem keeps free of host syncs, and it cannot run during CUDA-graph
  capture (a graph captured before tuning would freeze the heuristic config anyway);
* the first call of each key costs every candidate's compile plus ~30 ms of timing each: a
  visible stall in the middle of the first ``generate()`` steps, once per new (group, page size,
  query bucket) combination;
* the winner depends on timing noise, so two runs could pick different configs, with different
  reduction orders and so not bitwise-identical outputs; the heuristic is deterministic;
* the candidate lists are deliberately small (two configs at most per key), so the heuristic
  already is one of the few choices the tuner has.

The tuning cache is keyed on (kernel, dtype, head dim, GQA group, page size, query-length bucket).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from kvmem.ops._triton import (CACHE_DTYPES, DTYPE_NAMES, DTYPES, E4M3, FLOAT, FORMAT_NAMES, HEAD_DIMS,  # noqa: F401
                               AotVariant, block_d, interpreting, next_pow2, reduce_block_h)

SUPPORTED_DTYPES = DTYPES  # the Triton capability of paged_attention (kvmem/ops/paged_attention/capabilities.py)
SUPPORTED_CACHE_DTYPES = CACHE_DTYPES  # any float cache (converted on load) and float8 (e4m3fn, e5m2)
SUPPORTED_HEAD_DIMS = HEAD_DIMS
MAX_PAGE_SIZE = 256
SEARCH_BLOCK = 128  # sequences scanned per step when a prefill program looks up its sequence
DECODE_ROWS = (16, 64)  # padded (query x head-in-group) rows of a decode program
MAX_DECODE_SPLITS = 32
MIN_TILES_PER_SPLIT = 4
CTAS_PER_SM = 2


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int


def _is_fp32(dtype) -> bool:
    return dtype in (torch.float32, "fp32")


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------

# Config families: 80 = mma.sync GPUs (sm80/87 with 163 KiB of shared memory per block, but also
# sm86/89 and consumer Blackwell sm120/121 with 99 KiB: the family's configs must fit 99 KiB,
# checked by tools/aot_compile_triton.py), 90 = sm90/sm100-class (227 KiB).
ARCHS = (80, 90)


def family_of_cc(cc: int) -> int:
    """Config family of compute capability ``cc`` (e.g. 86 for 8.6): 90 for 9.x and 10.x, else 80."""
    return 90 if 90 <= cc < 110 else 80


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def arch_of(device) -> int:
    """Config family of ``device`` (:func:`family_of_cc`; 80 on CPU)."""
    if getattr(device, "type", "cpu") == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = _capability(idx)
        return family_of_cc(10 * major + minor)
    return 80


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------

SMALL_Q = 64  # max_seqlen_q at or below which prefill prefers its small-BLOCK_M config

# (BLOCK_M, BLOCK_N, num_warps, num_stages); first = default, second = small-query default.
# Chosen so that no variant spills registers (checked by tools/aot_compile_triton.py).
_PREFILL = {
    (80, 16, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (80, 16, 128): [(128, 32, 8, 3), (64, 32, 4, 3)],
    (80, 16, 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
    (90, 16, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (90, 16, 128): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (90, 16, 256): [(128, 32, 8, 2), (64, 32, 4, 3)],
    # fp32 uses exact (FMA) dots: small tiles keep registers and compile time down.
    (80, 32, 64): [(32, 16, 4, 2)],
    (80, 32, 128): [(32, 16, 8, 2)],
    (80, 32, 256): [(16, 16, 8, 2)],
    (90, 32, 64): [(32, 16, 4, 2)],
    (90, 32, 128): [(32, 16, 8, 2)],
    (90, 32, 256): [(16, 16, 8, 2)],
}

# (BLOCK_N, num_warps, num_stages) by (arch, dtype bits, BLOCK_D, ROWS); first = default. The
# 64-row tile (G x q_len > 16: large groups, speculative steps) gets a single config.
_DECODE = {
    (80, 16, 64, 16): [(64, 4, 3), (128, 4, 2)],
    (80, 16, 128, 16): [(64, 4, 3), (32, 4, 4)],
    (80, 16, 256, 16): [(32, 4, 3), (64, 8, 2)],
    (80, 16, 64, 64): [(64, 8, 3)],
    (80, 16, 128, 64): [(64, 8, 3)],
    (80, 16, 256, 64): [(32, 8, 3)],
    (90, 16, 64, 16): [(64, 4, 3), (128, 4, 2)],
    (90, 16, 128, 16): [(64, 4, 3), (32, 4, 4)],
    (90, 16, 256, 16): [(32, 4, 3), (64, 8, 2)],
    (90, 16, 64, 64): [(64, 8, 3)],
    (90, 16, 128, 64): [(64, 8, 3)],
    (90, 16, 256, 64): [(32, 8, 3)],
    (80, 32, 64, 16): [(32, 4, 2)],
    (80, 32, 128, 16): [(32, 8, 2)],
    (80, 32, 256, 16): [(16, 4, 2)],
    (80, 32, 64, 64): [(32, 8, 2)],
    (90, 32, 64, 16): [(32, 4, 2)],
    (90, 32, 128, 16): [(32, 8, 2)],
    (90, 32, 256, 16): [(16, 4, 2)],
    (90, 32, 64, 64): [(32, 8, 2)],
}


def _bits(dtype) -> int:
    return 32 if _is_fp32(dtype) else 16


def prefill_configs(dtype, bd: int, arch: int = 80) -> List[PrefillConfig]:
    """Deliberately small candidate list for (dtype, BLOCK_D, arch)."""
    return [PrefillConfig(*c) for c in _PREFILL[(90 if arch >= 90 else 80, _bits(dtype), bd)]]


def prefill_heuristic(dtype, bd: int, arch: int, max_seqlen_q: int) -> PrefillConfig:
    cands = prefill_configs(dtype, bd, arch)
    return cands[1] if (max_seqlen_q <= SMALL_Q and len(cands) > 1) else cands[0]


def prefill_key(dtype, head_dim, group, page_size, max_seqlen_q, arch) -> Tuple:
    return ("prefill", str(dtype), head_dim, group, page_size, max_seqlen_q <= SMALL_Q, arch)


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


# Longest query segment (a speculative-decoding step) the Triton op routes to its split-K decode
# kernel; longer segments go to its prefill kernel. Not a capability limit (the Triton op takes any
# length), unlike the CUDA capability's max_seqlen_q (kvmem/ops/paged_attention/capabilities.py).
DECODE_KERNEL_MAX_SEQLEN_Q = 8


def use_decode(max_seqlen_q: int, group: int) -> bool:
    """Split-K decode for single-token steps and for short multi-token steps (speculative
    decoding): its tile packs (query, head-in-group) rows, so each K/V tile is loaded once per
    KV head; it is used while those rows fit DECODE_ROWS[-1]."""
    return max_seqlen_q <= 1 or (max_seqlen_q <= DECODE_KERNEL_MAX_SEQLEN_Q and max_seqlen_q * group <= DECODE_ROWS[-1])


def decode_row_options(dtype, bd: int) -> Tuple[int, ...]:
    """ROWS values decode may use for (dtype, BLOCK_D): fp32 with BLOCK_D >= 128 sticks to 16
    rows (more row chunks) because a 64-row exact-fp32 (FMA) tile spills registers."""
    if _is_fp32(dtype) and bd >= 128:
        return DECODE_ROWS[:1]
    return DECODE_ROWS


def decode_rows(n_rows: int, dtype=torch.float16, bd: int = 128) -> int:
    opts = decode_row_options(dtype, bd)
    for r in opts:
        if n_rows <= r:
            return r
    return opts[-1]


def decode_configs(dtype, bd: int, arch: int = 80, rows: int = 16) -> List[DecodeConfig]:
    return [DecodeConfig(*c) for c in _DECODE[(90 if arch >= 90 else 80, _bits(dtype), bd, rows)]]


def decode_heuristic(dtype, bd: int, arch: int, rows: int) -> DecodeConfig:
    return decode_configs(dtype, bd, arch, rows)[0]


def decode_key(dtype, head_dim, group, page_size, rows, arch) -> Tuple:
    return ("decode", str(dtype), head_dim, group, page_size, rows, arch)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def decode_num_splits(num_seqs: int, programs_per_seq: int, max_seqlen_k: int, block_n: int,
                      device: torch.device) -> int:
    """Enough splits to give ~CTAS_PER_SM programs per SM, each with >= MIN_TILES_PER_SPLIT
    key tiles of the longest sequence (shorter sequences may get empty splits)."""
    base = max(1, num_seqs * programs_per_seq)
    want = -(-num_sms(device) * CTAS_PER_SM // base)
    tiles = -(-max(1, max_seqlen_k) // block_n)
    cap = max(1, tiles // MIN_TILES_PER_SPLIT)
    return max(1, min(want, cap, MAX_DECODE_SPLITS))


# ---------------------------------------------------------------------------------------------
# Autotuning cache
# ---------------------------------------------------------------------------------------------

_TUNED: Dict[Tuple, object] = {}


def autotune_enabled() -> bool:
    return os.environ.get("KVMEM_TRITON_AUTOTUNE", "0") in ("1", "true", "True") and not interpreting()


def tuned(kind: str, key: Tuple, candidates: List, heuristic, launch: Callable, device) -> object:
    """The cached best config for ``key``, benchmarking ``candidates`` with ``launch`` on the
    first call (GPU, autotuning enabled, not capturing a graph); otherwise ``heuristic``."""
    del kind
    if key in _TUNED:
        return _TUNED[key]
    if (not autotune_enabled() or getattr(device, "type", "cpu") != "cuda" or len(candidates) <= 1
            or torch.cuda.is_current_stream_capturing()):
        return heuristic
    import triton.testing

    best, best_t = heuristic, float("inf")
    for c in candidates:
        try:
            t = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=25)
        except Exception:  # e.g. out of shared memory on a smaller GPU
            continue
        if t < best_t:
            best, best_t = c, t
    _TUNED[key] = best
    return best


# ---------------------------------------------------------------------------------------------
# Enumeration for ahead-of-time compilation
# ---------------------------------------------------------------------------------------------

def rope_config(c):
    """The config a launch with RoPE on load runs: ``c`` unpipelined (``num_stages=1``). Each key
    tile then also loads its partner columns and cos/sin rows; pipelined, those stages overflow
    the sm80 family's 99 KiB of shared memory (measured with tools/aot_compile_triton.py)."""
    return dataclasses.replace(c, num_stages=1)


def cache_config(c, dtype, cache_dtype):
    """The config a launch over a ``cache_dtype`` cache runs: ``c``, unpipelined for fp32 queries
    over a cache of another dtype (float8 or 16-bit, converted on load). Pipelined, triton 3.9's
    FMA dot over converted tiles takes 255 registers and spills (176-224 B on sm80, measured with
    tools/aot_compile_triton.py); unpipelined it takes 64-80, as over an fp32 cache."""
    if _is_fp32(dtype) and not _is_fp32(cache_dtype):
        return dataclasses.replace(c, num_stages=1)
    return c


# (ROPE, ROPE_NEOX) constexpr pairs: no RoPE on load (ROPE_NEOX unused, pinned True), NeoX
# halves, GPT-J pairs.
ROPE_VARIANTS = ((False, True), (True, True), (True, False))


def aot_variants(arch: int = 80) -> Iterator[AotVariant]:
    """Every paged-attention (kernel, dtype, constexprs, num_warps, num_stages) that the launchers or the tuner
    can pick on ``arch`` for the supported dtypes and head dims over a cache of q's dtype, with and
    without softcap, without RoPE on load and with each of its two pairings; and representative
    variants over other caches (:func:`_aot_cache_variants`).
    Head dim, page size and group size are runtime arguments: they only pick BLOCK_D (next
    power of two of the head dim) and decode's ROWS. Causal, window, sink and lse are runtime
    flags (uniform branches outside the key loop, or masks inside it); HAS_SCALE is a constexpr
    (so the unscaled path compiles as it did before scales), True with float8 caches (which
    always have scales)."""
    bds = sorted({block_d(hd) for hd in SUPPORTED_HEAD_DIMS})
    seen = set()
    for v in list(_aot_variants(arch, bds)) + list(_aot_cache_variants(arch)):
        if v.name not in seen:  # rope_config can map two configs to one
            seen.add(v.name)
            yield v


def _prefill_variant(dtype, bd, c, softcap, rope, fmt=FLOAT, cache=None) -> AotVariant:
    return AotVariant("prefill", DTYPE_NAMES[dtype], (
        ("BLOCK_D", bd), ("BLOCK_M", c.block_m), ("BLOCK_N", c.block_n), ("SOFTCAP", softcap),
        ("FP32", dtype == torch.float32), ("ROPE", rope[0]), ("ROPE_NEOX", rope[1]), ("SEARCH_BLOCK", SEARCH_BLOCK),
        ("FORMAT", fmt), ("HAS_SCALE", fmt != FLOAT)), c.num_warps, c.num_stages, cache_dtype=cache)


def _decode_variant(dtype, bd, rows, c, softcap, rope, fmt=FLOAT, cache=None) -> AotVariant:
    return AotVariant("decode", DTYPE_NAMES[dtype], (
        ("BLOCK_D", bd), ("ROWS", rows), ("BLOCK_N", c.block_n), ("SOFTCAP", softcap),
        ("FP32", dtype == torch.float32), ("ROPE", rope[0]), ("ROPE_NEOX", rope[1]), ("FORMAT", fmt),
        ("HAS_SCALE", fmt != FLOAT)), c.num_warps, c.num_stages, cache_dtype=cache)


def _aot_variants(arch, bds) -> Iterator[AotVariant]:
    for dtype in SUPPORTED_DTYPES:
        dn = DTYPE_NAMES[dtype]
        for bd in bds:
            for softcap in (False, True):
                for rope in ROPE_VARIANTS:
                    for c in prefill_configs(dtype, bd, arch):
                        yield _prefill_variant(dtype, bd, rope_config(c) if rope[0] else c, softcap, rope)
                    for rows in decode_row_options(dtype, bd):
                        for c in decode_configs(dtype, bd, arch, rows):
                            yield _decode_variant(dtype, bd, rows, rope_config(c) if rope[0] else c, softcap, rope)
        for bd in bds:
            yield AotVariant("decode_reduce", dn, (("BLOCK_H", reduce_block_h(bd)), ("BLOCK_D", bd)), 4, 3)


# Caches other than q's dtype compiled ahead of time (the JIT compiles any other on first use): bf16
# queries over each float8 format at head dim 128 (and e4m3 at 64), without and with RoPE (NeoX),
# each kernel's default config; fp32 queries over a bf16 cache.
AOT_CACHE_CASES = tuple((torch.bfloat16, fmt, name, 128) for fmt, name in FORMAT_NAMES.items()) + (
    (torch.bfloat16, E4M3, "e4m3", 64), (torch.float32, FLOAT, "bf16", 128))


def _aot_cache_variants(arch) -> Iterator[AotVariant]:
    for dtype, fmt, cache, bd in AOT_CACHE_CASES:
        cache_dtype = "fp32" if cache == "fp32" else "other"
        for rope in ROPE_VARIANTS[:2] if fmt != FLOAT else ROPE_VARIANTS[:1]:
            c = cache_config(prefill_configs(dtype, bd, arch)[0], dtype, cache_dtype)
            yield _prefill_variant(dtype, bd, rope_config(c) if rope[0] else c, False, rope, fmt, cache)
            c = cache_config(decode_configs(dtype, bd, arch, DECODE_ROWS[0])[0], dtype, cache_dtype)
            yield _decode_variant(dtype, bd, DECODE_ROWS[0], rope_config(c) if rope[0] else c, False, rope, fmt, cache)
