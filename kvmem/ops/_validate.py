"""Argument-check helpers shared by the ops' ``validate`` modules.

Two levels, both run before anything is written:

* *structure* (always, free): types, ranks, shapes, dtypes, devices, scalar arguments;
* *values* (``check=True``, the default; needs a device->host sync): block-table entries that a
  sequence needs, ``seq_lens`` against capacity, ``cu_seqlens_q`` monotonic and matching ``q``,
  ``slot_mapping`` range and uniqueness. kvmem's own hot path, fed by ``plan()``, passes
  ``check=False``.

Every failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value)
whose message names the op, the argument and what was expected.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from kvmem.ops._common import FP8_DTYPES  # re-exported: the float8 cache dtypes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_CACHE_DTYPES = FLOAT_DTYPES + FP8_DTYPES  # cache dtypes allowed when k_scale/v_scale are given


def fail(op: str, arg: str, expected: str, got, exc=ValueError):
    raise exc(f"{op}: argument '{arg}' must be {expected}, got {got}")


def tensor(op: str, arg: str, t, *, ndim: int, dtypes: Sequence[torch.dtype], device=None, like: str = "q"):
    if not isinstance(t, torch.Tensor):
        fail(op, arg, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dim() != ndim:
        fail(op, arg, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(op, arg, names, str(t.dtype).replace("torch.", ""), TypeError)
    if device is not None and t.device != device:
        fail(op, arg, f"on device {device} (like {like})", t.device)


def shape(op: str, arg: str, t: torch.Tensor, expected: Sequence[int]):
    if tuple(t.shape) != tuple(expected):
        fail(op, arg, f"of shape {tuple(expected)}", f"shape {tuple(t.shape)}")


def unit_last_stride(op: str, arg: str, t: torch.Tensor):
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(op, arg, "unit-stride in its last dimension", f"stride {t.stride()}")


def host_int(op: str, arg: str, x, *, minimum: int = 0):
    if isinstance(x, bool) or not isinstance(x, int):
        fail(op, arg, "a host int (not a tensor)", type(x).__name__, TypeError)
    if x < minimum:
        fail(op, arg, f">= {minimum}", x)


def kv_scales(op, k_scale, v_scale, num_kv_heads, dev):
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None:
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.device != dev:
                fail(op, name, f"None or an fp32 tensor on {dev}", s if not isinstance(s, torch.Tensor) else f"{s.dtype} on {s.device}", TypeError)
            if s.dim() not in (0, 1) or (s.dim() == 1 and s.shape[0] != num_kv_heads):
                fail(op, name, f"a 0-d tensor or of shape ({num_kv_heads},)", f"shape {tuple(s.shape)}")
    if (k_scale is None) != (v_scale is None):
        fail(op, "v_scale" if k_scale is not None else "k_scale", "given together with the other scale", None)


def optional_tensor_device(op: str, arg: str, t: Optional[torch.Tensor], device):
    if t is not None and t.device != device:
        fail(op, arg, f"on device {device}", t.device)
