"""Argument checks of ``merge_states`` (see ``kvmem/ops/_validate.py``)."""

from __future__ import annotations

import torch

from kvmem.ops._validate import FLOAT_DTYPES, shape, tensor, unit_last_stride


def structure(out_a, lse_a, out_b, lse_b):
    op = "merge_states"
    tensor(op, "out_a", out_a, ndim=3, dtypes=FLOAT_DTYPES)
    dev = out_a.device
    tensor(op, "out_b", out_b, ndim=3, dtypes=(out_a.dtype,), device=dev, like="out_a")
    shape(op, "out_b", out_b, out_a.shape)
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        unit_last_stride(op, name, t)
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        tensor(op, name, t, ndim=2, dtypes=(torch.float32,), device=dev, like="out_a")
        shape(op, name, t, out_a.shape[:2])
