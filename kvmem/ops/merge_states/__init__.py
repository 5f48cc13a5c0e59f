"""``kvmem::merge_states``: the exact merge of two partial attentions (split-K, memory bank,
shared-prefix attention all reuse it). The op folder: ``params``, ``validate``, ``reference``,
``capabilities``, ``triton``."""

from __future__ import annotations

from typing import Tuple

import torch

from kvmem import dispatch
from kvmem.ops._common import check_all
from kvmem.ops.merge_states import capabilities, validate  # noqa: F401  (capabilities registers)
from kvmem.ops.merge_states.params import OP, MergeStatesParams

__all__ = ["merge_states", "MergeStatesParams"]


@torch.library.custom_op("kvmem::merge_states", mutates_args=("out", "lse"))
def _merge_states_op(out: torch.Tensor, lse: torch.Tensor, out_a: torch.Tensor, lse_a: torch.Tensor,
                     out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    params = MergeStatesParams.from_schema(out, lse, out_a, lse_a, out_b, lse_b)
    dispatch.select(params.call()).run(OP, params)


@_merge_states_op.register_fake
def _(out, lse, out_a, lse_a, out_b, lse_b):
    torch._check(out_a.dim() == 3 and lse_a.dim() == 2, lambda: "merge_states: out_a 3-D, lse_a 2-D")
    checks = [(t.shape[i], out_a.shape[i], f"{name}.shape[{i}] vs out_a.shape[{i}]")
              for name, t in (("out", out), ("out_b", out_b)) for i in range(3)]
    checks += [(t.shape[i], out_a.shape[i], f"{name}.shape[{i}] vs out_a.shape[{i}]")
               for name, t in (("lse", lse), ("lse_a", lse_a), ("lse_b", lse_b)) for i in range(2)]
    check_all(checks)
    return None


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets (``kvmem.ops.reference.merge_states``).

    Parameters
    ----------
    out_a, out_b: [num_tokens, num_heads, head_dim]
    lse_a, lse_b: [num_tokens, num_heads] fp32; ``-inf`` marks an empty partial

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in out_a's dtype; lse: [num_tokens, num_heads] fp32
    """
    validate.structure(out_a, lse_a, out_b, lse_b)
    params = MergeStatesParams.build(out_a, lse_a, out_b, lse_b)
    torch.ops.kvmem.merge_states(*params.to_schema())
    return params.out, params.lse
