"""``kvmem::merge_states``: the exact merge of two partial attentions (split-K, memory bank,
shared-prefix attention all reuse it)."""

from __future__ import annotations

from typing import Tuple

import torch

from kvmem import backends
from kvmem.ops import _validate


@torch.library.custom_op("kvmem::merge_states", mutates_args=("out", "lse"))
def _merge_states_op(out: torch.Tensor, lse: torch.Tensor, out_a: torch.Tensor, lse_a: torch.Tensor,
                     out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    backends.select(backends.Call.merge_states(out_a)).merge_states(out, lse, out_a, lse_a, out_b, lse_b)


@_merge_states_op.register_fake
def _(out, lse, out_a, lse_a, out_b, lse_b):
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
    _validate.merge_states_structure(out_a, lse_a, out_b, lse_b)
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
    torch.ops.kvmem.merge_states(out, lse, out_a, lse_a, out_b, lse_b)
    return out, lse
