"""memory_attention on every backend (the reference, the C++ CPU and Triton composites: compacted
tables + one paged_attention per KV head, Triton under the interpreter) against an independent
dense formulation, against full attention, and against the reference; bad input.

Cases (``memory_cases.make_memory_case``): shuffled pages from a larger pool, NaN in every slot
that holds no live key and -1 in the block-table entries of evicted blocks, ragged rows.
A backend whose record lacks a feature a case uses is checked to reject it (forced), not skipped.
"""

import logging
import math

import pytest
import torch

from kvmem import dispatch
from kvmem.ops.memory_attention import capabilities, memory_attention, paged, reference
from kvmem.ops.memory_attention.params import MemoryAttentionParams
from kvmem.ops.paged_attention import reference as paged_reference
from memory_cases import dense_memory_attention, force_backend, make_memory_case, memory_backends, rejection, rope_table
from tolerances import OUT, TRITON_LSE, TRITON_OUT, assert_close

# Ragged batches by mode: (q_lens, kv_lens), block_size 16, 1 sink block, window 32.
MODES = {
    "decode": ([1, 1, 1, 1], [1, 40, 97, 160]),  # all-sinks row, short bank, longer banks
    "chunked_prefill": ([24, 7, 0, 16], [24, 88, 50, 130]),  # first chunk, later chunks, an idle row
    "mixed": ([1, 13, 1], [150, 77, 16]),
}
# (num_heads, num_kv_heads): GQA groups 1, 3, 4, 7, 8.
GROUPS = [(2, 2), (6, 2), (4, 1), (7, 1), (8, 1)]
BACKENDS = memory_backends("memory_attention")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    force_backend(monkeypatch, request.param)
    return request.param


def _tolerance(backend, dtype=torch.float32):
    if backend == "triton":
        return TRITON_OUT[dtype], TRITON_LSE
    return OUT[dtype], {}


def _run(case, backend="reference", **extra):
    """(out, lse) of the public op on the forced ``backend``; None when its record rejects the
    case (checked: the forced call raises, naming why)."""
    kw = dict(case.memory_kwargs(), **extra)
    why = rejection("memory_attention", backend, MemoryAttentionParams.build(*case.args(), **kw).call())
    if why is not None:
        with pytest.raises(RuntimeError, match=f"KVMEM_BACKEND={backend} cannot run memory_attention"):
            memory_attention(*case.args(), **kw)
        return None
    return memory_attention(*case.args(), **kw, return_lse=True)


_DENSE = {}  # the dense formulation (fp64, slow) of a case, computed once for all backends


def _case(q_lens, kv_lens, **kw):
    """``make_memory_case`` (seeded: the same case for every backend), keyed for ``_dense``."""
    case = make_memory_case(q_lens, kv_lens, **kw)
    case.key = repr((q_lens, kv_lens, sorted(kw.items(), key=str)))
    return case


def _dense(case, **dense_kw):
    key = (getattr(case, "key", None), repr(sorted(dense_kw.items())))
    if key[0] is None:
        return dense_memory_attention(case, **dense_kw)
    if key not in _DENSE:
        _DENSE[key] = dense_memory_attention(case, **dense_kw)
    return _DENSE[key]


def _check_dense(case, got, backend="reference", dtype=torch.float32, **dense_kw):
    if got is None:
        return
    out, lse = got
    assert not out.isnan().any()
    want_out, want_lse, _, _ = _dense(case, **dense_kw)
    out_tol, lse_tol = _tolerance(backend, dtype)
    assert_close(out.float(), want_out.float(), **(out_tol if dtype != torch.float32 or backend == "triton" else {}))
    assert_close(lse, want_lse.float(), what="lse", **lse_tol)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("heads", GROUPS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
def test_matches_dense_formulation(mode, heads, backend):
    q_lens, kv_lens = MODES[mode]
    if backend == "triton" and mode != "mixed":
        pytest.skip("Triton interpreter: every GQA group in the mixed mode (test_composite_equals_reference "
                    "runs every mode) (time)")
    case = _case(q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], top_k=3, extra_bank=1,
                 seed=hash((mode, heads)) % 1000)
    got = _run(case, backend)
    assert got is not None  # every backend runs the plain op
    _check_dense(case, got, backend)


@pytest.mark.parametrize("head_dim", [128, 80])
def test_head_dims_exact_mode(head_dim, backend):
    if backend == "triton" and head_dim == 128:
        pytest.skip("Triton interpreter: head dim 80 (a padded tile) only (time)")
    q_lens, kv_lens = MODES["mixed"]
    case = _case(q_lens, kv_lens, num_heads=8, num_kv_heads=1, head_dim=head_dim, top_k=2, extra_bank=1, seed=head_dim)
    _check_dense(case, _run(case, backend), backend)


@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (80, 80), (64, 32)], ids=str)
@pytest.mark.parametrize("rope_neox", [True, False], ids=["neox", "gptj"])
def test_extend_mode_matches_dense_formulation(head_dim, rot_dim, rope_neox):
    q_lens, kv_lens = MODES["chunked_prefill"]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, head_dim=head_dim, top_k=2,
                            extra_bank=2, rope_rot_dim=rot_dim, seed=head_dim + rot_dim)
    _check_dense(case, _run(case, rope_neox=rope_neox), rope_neox=rope_neox)


@pytest.mark.parametrize("features", [dict(softcap=4.0), dict(sink_logits=True), dict(kv_scale=True),
                                      dict(softcap=3.0, sink_logits=True, kv_scale=True, rope_rot_dim=64)], ids=str)
def test_features_match_dense_formulation(features, backend):
    q_lens, kv_lens = MODES["mixed"]
    case = _case(q_lens, kv_lens, num_heads=4, num_kv_heads=2, top_k=4, extra_bank=1, seed=7, **features)
    _check_dense(case, _run(case, backend), backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, backend):
    q_lens, kv_lens = MODES["decode"]
    case = _case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=2, dtype=dtype, seed=3)
    got = _run(case, backend)
    assert got is not None and got[0].dtype == dtype
    _check_dense(case, got, backend, dtype=dtype)


@pytest.mark.parametrize("rope", [False, True], ids=["exact", "extend"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_selecting_every_block_is_full_attention(mode, rope, backend):
    """With the whole history in the bank and all of it selected, compaction is the identity: the
    op equals paged_attention over the full history (with RoPE at original positions too)."""
    if backend == "triton" and mode != "mixed" and not rope:
        pytest.skip("Triton interpreter: the mixed mode only (time)")
    q_lens, kv_lens = MODES[mode]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=16, select_all=True,
                            rope_rot_dim=64 if rope else None, seed=11)
    got = _run(case, backend)
    if got is None:
        return
    out, lse = got
    tol = dict(atol=2e-4, rtol=2e-4) if backend == "triton" else dict(atol=1e-5, rtol=1e-5)
    rope_kw = {"rope_cos_sin": case.kwargs["rope_cos_sin"]} if rope else {}
    want_out, want_lse = paged_reference.paged_attention(
        case.q, case.k_cache, case.v_cache, case.full_table, case.seq_lens, case.cu_seqlens_q,
        case.max_seqlen_q, case.max_seqlen_k, scale=1 / math.sqrt(64), **rope_kw)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)


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
def test_empty_bank_and_top_k_beyond_bank(top_k, backend):
    q_lens, kv_lens = MODES["decode"]
    case = _case(q_lens, kv_lens, num_heads=3, num_kv_heads=1, top_k=top_k, seed=2)
    _check_dense(case, _run(case, backend), backend)
    empty = _case([1, 3], [1, 3], num_heads=3, num_kv_heads=1, top_k=top_k, seed=2)
    assert empty.bank_table.shape[1] == 1 and empty.bank_lens.tolist() == [0, 0]
    _check_dense(empty, _run(empty, backend), backend)


def test_block_mass():
    q_lens, kv_lens = MODES["chunked_prefill"]
    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=3, extra_bank=2, sink_logits=True,
                            rope_rot_dim=64, seed=9)
    mass = torch.full(case.bank_table.shape[:1] + (2,) + case.bank_table.shape[1:], math.nan)
    assert _run(case, block_mass=mass) is not None
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


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "reference"])
def test_block_mass_falls_back_to_the_reference(name, monkeypatch, caplog):
    """The composites do not compute block_mass: forced, they reject it; in auto mode the call
    runs on the reference with one log line naming the feature."""
    case = make_memory_case([1, 1], [70, 90], num_heads=4, num_kv_heads=2, top_k=2, extra_bank=1, seed=4)
    mass = torch.zeros(2, 2, case.bank_table.shape[1])
    call = MemoryAttentionParams.build(*case.args(), **case.memory_kwargs(), block_mass=mass).call()
    force_backend(monkeypatch, name)
    assert "block_mass" in rejection("memory_attention", name, call)
    with pytest.raises(RuntimeError, match="block_mass"):
        memory_attention(*case.args(), **case.memory_kwargs(), block_mass=mass)
    if name != "cpu":  # auto mode on CPU tensors: the cpu composite is the one that falls back
        return
    monkeypatch.delenv("KVMEM_BACKEND")
    dispatch._select.cache_clear()
    dispatch._logged.discard(("memory_attention", "cpu", "feature(s) ['block_mass'] not implemented"))
    with caplog.at_level(logging.WARNING, logger="kvmem"):
        out = memory_attention(*case.args(), **case.memory_kwargs(), block_mass=mass)
        memory_attention(*case.args(), **case.memory_kwargs(), block_mass=mass)
    lines = [r.getMessage() for r in caplog.records if "memory_attention falls back" in r.getMessage()]
    assert len(lines) == 1 and "block_mass" in lines[0] and "to reference" in lines[0], lines
    want_mass = torch.zeros_like(mass)
    want, _ = reference.memory_attention(*case.args(), **case.memory_kwargs(), block_mass=want_mass)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(mass, want_mass)


# The composite (paged.py: compacted tables + one paged_attention per KV head) against the
# reference, outputs NaN before the call: on the C++ CPU paged kernels for what they take, on the
# reference paged_attention for RoPE on load (which they do not), and a few on Triton.
_KERNEL = "cpu" if "cpu" in BACKENDS else "reference"
COMPOSITE_CASES = [("reference" if f == "rope" else _KERNEL, m, h, f) for m in sorted(MODES) for h in GROUPS
                   for f in ("plain", "rope", "softcap_sinks")]
COMPOSITE_CASES += [("triton", m, (7, 1), "softcap_sinks") for m in sorted(MODES) if "triton" in BACKENDS]


@pytest.mark.parametrize("paged_backend,mode,heads,feature", COMPOSITE_CASES,
                         ids=lambda x: f"Hq{x[0]}Hkv{x[1]}" if isinstance(x, tuple) else str(x))
def test_composite_equals_reference(paged_backend, mode, heads, feature, monkeypatch):
    q_lens, kv_lens = MODES[mode]
    extra = {"rope": dict(rope_rot_dim=32), "softcap_sinks": dict(softcap=20.0, sink_logits=True)}.get(feature, {})
    case = make_memory_case(q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], top_k=3, extra_bank=1,
                            seed=len(mode) * 7 + heads[0], **extra)
    if paged_backend == "triton":
        force_backend(monkeypatch, "triton")  # Triton on CPU tensors: forced, under the interpreter
    kw = case.memory_kwargs()
    scale = 1.0 / math.sqrt(case.q.shape[-1])
    want_out, want_lse = reference.memory_attention(*case.args(), scale=scale, **kw)
    out = torch.full_like(case.q, math.nan)
    lse = torch.full(case.q.shape[:2], math.nan)
    paged.memory_attention(*case.args(), scale=scale, out=out, lse=lse,
                           paged_attention=capabilities.paged_on(paged_backend), **kw)
    out_tol, lse_tol = _tolerance(paged_backend)
    assert_close(out, want_out, **out_tol)
    assert_close(lse, want_lse, what="lse", **lse_tol)


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
