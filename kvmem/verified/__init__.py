"""The record of configurations verified on real GPUs (``cuda.json`` beside this file).

``benchmarks/gpu_check.sh`` runs every backend against the reference on a GPU; the ``gpu`` tests of
tests/ops write the CUDA passes to ``$OUT/verified.json`` in exactly this file's format, and
``python tools/merge_verified.py $OUT/verified.json`` merges them into ``kvmem/verified/cuda.json``
(committing that is what lets the dispatcher choose the CUDA kernels by default on that GPU
architecture). The format::

    {"records": {"sm_90": {"gpu": ..., "driver": ..., "torch": ..., "triton": ..., "date": ...,
                           "passed": [{"op": "paged_attention", "dtype": "bfloat16",
                                       "head_dim": 128, "block_size": 16, "max_group": 16},
                                      {"op": "merge_states", "dtype": "bfloat16",
                                       "head_dim": 128, "block_size": 0}, ...]}}}

``block_size`` is 0 for ops without pages. ``cache_dtype`` (ops with a KV cache; absent: the
entry's ``dtype``) and ``kv_scale`` (true: with k_scale / v_scale; absent: without) say which
cache an entry verified: a call with another cache (float8, a 16-bit cache under the other
16-bit q) or with scales is verified only by an entry that names them, so new cache kernels
start unverified. ``max_group`` (paged_attention only) is the largest
GQA group (query heads per KV head) the GPU tests ran for that entry; a call with a larger group
is not verified (the CUDA kernel cuts groups above 8 into head chunks, a path only large groups
take). Entries without ``max_group`` count as verified up to group 8.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Dict, Iterable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MAX_GROUP = 8  # for entries written before max_group existed
_ENTRY_KEYS = ("op", "dtype", "head_dim", "block_size")


def path_of(backend: str) -> str:
    return os.path.join(HERE, f"{backend}.json")


@functools.lru_cache(maxsize=None)
def record(backend: str) -> dict:
    """``{arch: {..., "passed": [...]}}`` of the committed record of ``backend`` ({} if none)."""
    return load_records(path_of(backend))


def load_records(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("records", {})


def _key(e: dict):
    return (e["op"], e["dtype"], int(e["head_dim"]), int(e.get("block_size", 0)), e.get("cache_dtype", e["dtype"]),
            bool(e.get("kv_scale", False)))


def passed_groups(entries: Iterable[dict]) -> Dict[tuple, int]:
    """``{(op, dtype, head_dim, block_size, cache_dtype, kv_scale): max_group}`` of record entries."""
    out: Dict[tuple, int] = {}
    for e in entries:
        k = _key(e)
        out[k] = max(out.get(k, 0), int(e.get("max_group", DEFAULT_MAX_GROUP)))
    return out


@functools.lru_cache(maxsize=None)
def _passed(backend: str, arch: str) -> Dict[tuple, int]:
    return passed_groups(record(backend).get(arch, {}).get("passed", []))


def call_key(call) -> tuple:
    dtype = str(call.dtype).replace("torch.", "")
    block_size = call.block_size if call.op == "paged_attention" else 0
    cache_dtype = dtype if call.cache_dtype is None else str(call.cache_dtype).replace("torch.", "")
    return (call.op, dtype, int(call.head_dim), int(block_size), cache_dtype, "kv_scale" in call.features)


def matches(passed: Dict[tuple, int], call) -> bool:
    """Whether ``call`` (a kvmem.backends.Call) is covered by ``passed`` (see passed_groups)."""
    max_group = passed.get(call_key(call))
    if max_group is None:
        return False
    if call.op == "paged_attention" and call.num_kv_heads:
        return call.num_heads // call.num_kv_heads <= max_group
    return True


def is_verified(backend: str, arch: str, call) -> bool:
    """Whether ``call`` (a kvmem.backends.Call) matches a passing entry for ``arch``."""
    return matches(_passed(backend, arch), call)


def clear_cache() -> None:
    """Forget the loaded records (after writing a new one in the same process)."""
    record.cache_clear()
    _passed.cache_clear()


def gpu_driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi, or 'unknown'."""
    import subprocess

    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        if res.returncode == 0 and lines:
            return lines[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def sort_entries(entries: Iterable[dict]) -> List[dict]:
    """Entries deduplicated by key (largest max_group kept), in a stable order."""
    best: Dict[tuple, dict] = {}
    for e in entries:
        e = dict(e)
        k = _key(e)
        old = best.get(k)
        if old is None or int(e.get("max_group", 0)) > int(old.get("max_group", 0)):
            best[k] = e
    return [best[k] for k in sorted(best)]


def make_record(arch: str, passed: Iterable[dict], *, gpu: str, driver: str, torch_version: str,
                triton_version: Optional[str], cuda_version: Optional[str] = None,
                date: Optional[str] = None, doc: Optional[str] = None) -> dict:
    """A whole record file (the format of cuda.json) holding one arch."""
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"gpu": gpu, "driver": driver, "torch": torch_version, "triton": triton_version,
             "cuda": cuda_version, "date": date, "passed": sort_entries(passed)}
    out = {"records": {arch: entry}}
    if doc:
        out = {"_doc": doc, **out}
    return out


def merge_files(into: str, new: str) -> List[str]:
    """Merge the records of file ``new`` into file ``into`` (each arch of ``new`` replaces that
    arch's record: a fresh GPU run supersedes the old one). Returns the archs written."""
    with open(new) as f:
        incoming = json.load(f)
    recs = incoming.get("records")
    if not isinstance(recs, dict) or not recs:
        raise ValueError(f"{new}: no 'records' (expected the format of kvmem/verified/cuda.json)")
    for arch, rec in recs.items():
        if not arch.startswith("sm_") or not isinstance(rec.get("passed"), list) or "date" not in rec:
            raise ValueError(f"{new}: record {arch!r} needs an sm_XY arch, a 'date' and a 'passed' list")
        for e in rec["passed"]:
            missing = [k for k in _ENTRY_KEYS if k not in e]
            if missing:
                raise ValueError(f"{new}: {arch} entry {e} lacks {missing}")
    if os.path.exists(into):
        with open(into) as f:
            base = json.load(f)
    else:
        base = {}
    base.setdefault("records", {})
    for arch, rec in recs.items():
        base["records"][arch] = {**rec, "passed": sort_entries(rec["passed"])}
    base["records"] = dict(sorted(base["records"].items()))
    with open(into, "w") as f:
        json.dump(base, f, indent=1)
        f.write("\n")
    clear_cache()
    return sorted(recs)
