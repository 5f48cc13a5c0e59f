"""memory_attention: the reference against an independent dense formulation, full attention, bad input."""

import math

import pytest
import torch

from kvmem.ops import reference as paged_reference
from kvmem.ops.memory_attention import memory_attention
from memory_cases import dense_memory_attention, make_memory_case, rope_table
from tolerances import OUT, assert_close

# Ragged batches by mode: (q_lens, kv_lens), block_size 16, 1 sink block, window 32.
MODES = {
    "decode": ([1, 1, 1, 1], [1, 40, 97, 160]),  # all-sinks row, short bank, longer banks
    "chunked_prefill": ([24, 7, 0, 16], [24, 88, 50, 130]),  # first chunk, later chunks, an idle row
    "mixed": ([1, 13, 1], [150, 77, 16]),
}
# (num_heads, num_kv_heads): GQA groups 1, 3, 4, 7, 8.
GROUPS = [(2, 2), (6, 2), (4, 1), (7, 1), (8, 1)]


def _run(case, **extra):
    return memory_attention(*case.args(), **case.memory_kwargs(), return_lse=True, **extra)


def _check_dense(case, out, lse, dtype=torch.float32, **dense_kw):
    want_out, want_lse, _, _ = dense_memory_attention(case, **dense_kw)
    assert_close(out.float(), want_out.float(), **(OUT[dtype] if dtype != torch.float32 else {}))
    assert_close(lse, want_lse.float(), what="lse")


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
def test_matches_dense_formulation(mode, heads):
    q_lens, kv_lens = MODES[mode]
    case = make_memory_case(q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], top_k=3, extra_bank=1,
                            seed=hash((mode, heads)) % 1000)
    out, lse = _run(case)
    assert not out.isnan().any()
    _check_dense(case, out, lse)


@pytest.mark.parametrize("head_dim", [128, 80])
def test_head_dims_exact_mode(head_dim):
    q_lens, kv_lens = MODES["mixed"]
    case = make_memory_case(q_lens, kv_lens, num_heads=8, num_kv_heads=1, head_dim=head_dim, top_k=2, extra_bank=1,
                            seed=head_dim)
    out, lse = _run(case)
    _check_dense(case, out, lse)


@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (80, 80), (64, 32)], ids=str)
@pytest.mark.parametrize("rope_neox", [True, False], ids=["neox", "gptj"])
def test_extend_mode_matches_dense_formulation(head_dim, rot_dim, rope_neox):
    q_lens, kv_lens = MODES["chunked_prefill"]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, head_dim=head_dim, top_k=2,
                            extra_bank=2, rope_rot_dim=rot_dim, seed=head_dim + rot_dim)
    out, lse = _run(case, rope_neox=rope_neox)
    _check_dense(case, out, lse, rope_neox=rope_neox)


@pytest.mark.parametrize("features", [dict(softcap=4.0), dict(sink_logits=True), dict(kv_scale=True),
                                      dict(softcap=3.0, sink_logits=True, kv_scale=True, rope_rot_dim=64)], ids=str)
def test_features_match_dense_formulation(features):
    q_lens, kv_lens = MODES["mixed"]
    case = make_memory_case(q_lens, kv_lens, num_heads=4, num_kv_heads=2, top_k=4, extra_bank=1, seed=7, **features)
    out, lse = _run(case)
    _check_dense(case, out, lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype):
    q_lens, kv_lens = MODES["decode"]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=2, dtype=dtype, seed=3)
    out, lse = _run(case)
    assert out.dtype == dtype
    _check_dense(case, out, lse, dtype=dtype)


@pytest.mark.parametrize("rope", [False, True], ids=["exact", "extend"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_selecting_every_block_is_full_attention(mode, rope):
    """With the whole history in the bank and all of it selected, compaction is the identity: the
    op equals paged_attention over the full history (with RoPE at original positions too)."""
    q_lens, kv_lens = MODES[mode]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=16, select_all=True,
                            rope_rot_dim=64 if rope else None, seed=11)
    out, lse = _run(case)
    rope_kw = {"rope_cos_sin": case.kwargs["rope_cos_sin"]} if rope else {}
    want_out, want_lse = paged_reference.paged_attention(
        case.q, case.k_cache, case.v_cache, case.full_table, case.seq_lens, case.cu_seqlens_q,
        case.max_seqlen_q, case.max_seqlen_k, scale=1 / math.sqrt(64), **rope_kw)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_extend_window_only_is_rope_at_original_positions():
    """No bank yet (w0 == sink_blocks): positions are original; paged_attention with RoPE on load."""
    case = make_memory_case([5, 1], [30, 20], num_heads=4, num_kv_heads=2, sink_blocks=1, window=64, top_k=2,
                            rope_rot_dim=64, seed=5)
    assert case.window_start.tolist() == [1, 1] and case.bank_lens.tolist() == [0, 0]
    out, lse = _run(case)
    want_out, want_lse = paged_reference.paged_attention(
        case.q, case.k_cache, case.v_cache, case.full_table, case.seq_lens, case.cu_seqlens_q,
        case.max_seqlen_q, case.max_seqlen_k, scale=1 / math.sqrt(64), rope_cos_sin=case.kwargs["rope_cos_sin"])
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [0, 1, 50], ids=lambda k: f"top_k{k}")
def test_empty_bank_and_top_k_beyond_bank(top_k):
    q_lens, kv_lens = MODES["decode"]
    case = make_memory_case(q_lens, kv_lens, num_heads=3, num_kv_heads=1, top_k=top_k, seed=2)
    out, lse = _run(case)
    _check_dense(case, out, lse)
    empty = make_memory_case([1, 3], [1, 3], num_heads=3, num_kv_heads=1, top_k=top_k, seed=2)
    assert empty.bank_table.shape[1] == 1 and empty.bank_lens.tolist() == [0, 0]
    out, lse = _run(empty)
    _check_dense(empty, out, lse)


def test_block_mass():
    q_lens, kv_lens = MODES["chunked_prefill"]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=3, extra_bank=2, sink_logits=True,
                            rope_rot_dim=64, seed=9)
    mass = torch.full(case.bank_table.shape[:1] + (2,) + case.bank_table.shape[1:], math.nan)
    _run(case, block_mass=mass)
    _, _, want_mass, rest = dense_memory_attention(case)
    torch.testing.assert_close(mass, want_mass.float(), atol=1e-5, rtol=1e-5)
    # Per row: the bank's mass is the queries' unit mass minus what the sinks, window and sink logit took.
    group = 3
    for b in range(len(q_lens)):
        lo, hi = case.cu_seqlens_q[b], case.cu_seqlens_q[b + 1]
        for h in range(2):
            outside = rest[lo:hi, h * group:(h + 1) * group].sum()
            total = (hi - lo) * group
            torch.testing.assert_close(mass[b, h].sum().double(), total - outside, atol=1e-4, rtol=1e-5)
    unselected = torch.ones_like(mass, dtype=torch.bool)
    for b in range(len(q_lens)):
        for h in range(2):
            for i in case.selected[b, h]:
                if i >= 0:
                    unselected[b, h, i] = False
    assert (mass[unselected] == 0).all()


def _bad(case, match, **override):
    kw = case.memory_kwargs()
    kw.update(override)
    with pytest.raises((ValueError, TypeError), match=match):
        memory_attention(*case.args(), **kw)


def test_bad_input_is_named():
    case = make_memory_case([1, 1], [70, 90], num_heads=4, num_kv_heads=2, top_k=2, extra_bank=1, seed=1)
    ws, sel = case.window_start, case.selected
    _bad(case, "'sink_blocks'", sink_blocks=-1)
    _bad(case, "'sink_blocks'", sink_blocks=1.0)
    _bad(case, "'window_start'.*>= sink_blocks", window_start=torch.zeros_like(ws))
    _bad(case, "'window_start'.*first query", window_start=ws + 5)
    _bad(case, "'window_start'", window_start=ws.long())
    _bad(case, "'selected'.*shape", selected=sel[:, :1])
    flipped = sel.clone()
    flipped[0, 0, :2] = flipped[0, 0, :2].flip(0)
    _bad(case, "'selected'.*ascending", selected=flipped)
    gap = sel.clone()
    gap[0, 0, 0] = -1
    _bad(case, "'selected'.*ascending", selected=gap)
    out_of_range = sel.clone()
    out_of_range[1, 1, -1] = case.bank_table.shape[1]
    _bad(case, "'selected'.*max_bank", selected=out_of_range)
    in_window = case.bank_table.clone()
    in_window[0, int(sel[0, 0, 0])] = case.block_table[0, int(ws[0])]
    _bad(case, "'bank_table'.*window pages", bank_table=in_window)
    uneven = sel.clone()
    uneven[0, 1, 1] = -1
    _bad(case, "'selected'.*same number", selected=uneven, rope_cos_sin=rope_table(200, 64))
    _bad(case, "'rope_cos_sin'.*positions", rope_cos_sin=rope_table(10, 64))
    _bad(case, "'block_mass'", block_mass=torch.zeros(2, 2, 1))
    _bad(case, "'bank_table'", bank_table=case.bank_table[:1])
