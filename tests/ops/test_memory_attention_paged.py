"""memory_attention on the paged kernels (compacted tables, one paged_attention per KV head) equals
the reference, on every paged backend that can run the case."""

import math

import pytest
import torch

from kvmem.ops.memory_attention import paged as paged_memory
from kvmem.ops.memory_attention import reference
from memory_cases import make_memory_case
from tolerances import OUT, assert_close

CASES = {
    "decode": ([1, 1, 1, 1], [1, 40, 97, 160]),
    "chunked_prefill": ([24, 7, 0, 16], [24, 88, 50, 130]),
    "mixed": ([1, 13, 1], [150, 77, 16]),
}
GROUPS = [(2, 2), (6, 2), (4, 1), (7, 1), (8, 1)]


def _backend_fn(name):
    from kvmem import backends

    def run(q, k_cache, v_cache, block_table, seq_lens, cu, mq, mk, *, scale, causal, softcap, sink_logits,
            rope_cos_sin, rope_neox, out, return_lse, k_scale=None, v_scale=None):
        import kvmem

        return kvmem.paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu, mq, mk, scale=scale,
                                     causal=causal, softcap=softcap, sink_logits=sink_logits, k_scale=k_scale,
                                     v_scale=v_scale, rope_cos_sin=rope_cos_sin, rope_neox=rope_neox, out=out,
                                     return_lse=return_lse, check=True)
    return run


@pytest.mark.parametrize("mode", sorted(CASES))
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
@pytest.mark.parametrize("feature", ["plain", "rope", "softcap_sinks"])
def test_paged_equals_reference(mode, heads, feature):
    q_lens, kv_lens = CASES[mode]
    extra = {"rope": dict(rope_rot_dim=32), "softcap_sinks": dict(softcap=20.0, sink_logits=True)}.get(feature, {})
    case = make_memory_case(q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], top_k=3, extra_bank=1,
                            seed=len(mode) * 7 + heads[0], **extra)
    kw = case.memory_kwargs()
    scale = 1.0 / math.sqrt(case.q.shape[-1])
    want_out, want_lse = reference.memory_attention(*case.args(), scale=scale, **kw)
    out = torch.full_like(case.q, math.nan)
    lse = torch.full(case.q.shape[:2], math.nan)
    paged_memory.memory_attention(*case.args(), scale=scale, out=out, lse=lse,
                                  paged_attention=_backend_fn("auto"), **kw)
    assert_close(out, want_out)
    assert_close(lse, want_lse, what="lse")
