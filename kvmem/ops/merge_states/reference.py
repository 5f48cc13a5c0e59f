"""Reference ``merge_states`` (semantics: ``kvmem.ops.spec``)."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["merge_states"]


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    ``lse = log(exp(lse_a) + exp(lse_b))``,
    ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``; a partial whose lse is
    ``-inf`` (it saw no key) contributes nothing, and two empty partials give ``out = 0``,
    ``lse = -inf``.

    Parameters
    ----------
    out_a, out_b: [num_tokens, num_heads, head_dim]
    lse_a, lse_b: [num_tokens, num_heads] fp32

    Returns
    -------
    out: [num_tokens, num_heads, head_dim] in out_a's dtype; lse: [num_tokens, num_heads] fp32
    """
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(la - safe), torch.zeros_like(lse))[..., None]
    wb = torch.where(finite, torch.exp(lb - safe), torch.zeros_like(lse))[..., None]
    oa = torch.where(wa > 0, out_a.float(), torch.zeros((), device=out_a.device))
    ob = torch.where(wb > 0, out_b.float(), torch.zeros((), device=out_b.device))
    out = oa * wa + ob * wb
    return out.to(out_a.dtype), lse
