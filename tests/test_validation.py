"""Bad input: a named TypeError/ValueError, and nothing written (caches, out)."""

import math

import pytest
import torch

import kvmem
from cases import make_case


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, tensors):
    for b, t in zip(before, tensors):
        torch.testing.assert_close(t, b, equal_nan=True, atol=0, rtol=0)


def base():
    return make_case([3, 1], [10, 20], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=1)


def call_args(case, **over):
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, block_table=case.block_table,
                seq_lens=case.seq_lens, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=case.max_seqlen_q,
                max_seqlen_k=case.max_seqlen_k, **case.kwargs)
    args.update(over)
    return args


def _table(case, b, c, value):
    t = case.block_table.clone()
    t[b, c] = value
    return t


# (name, builder(case) -> overrides, exception, words that must appear in the message)
PAGED_BAD = [
    ("q_int", lambda c: dict(q=c.q.to(torch.int32)), TypeError, ["'q'", "float"]),
    ("q_2d", lambda c: dict(q=c.q[:, 0]), ValueError, ["'q'", "3-D"]),
    ("q_last_stride", lambda c: dict(q=c.q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, ["'q'", "unit-stride"]),
    ("cache_dtype_pair", lambda c: dict(k_cache=c.k_cache.half()), TypeError, ["'v_cache'", "float16"]),
    ("cache_int", lambda c: dict(k_cache=c.k_cache.int(), v_cache=c.v_cache.int()), TypeError, ["'k_cache'", "bfloat16"]),
    ("fp8_no_scale", lambda c: dict(k_cache=c.k_cache.to(torch.float8_e4m3fn), v_cache=c.v_cache.to(torch.float8_e4m3fn)),
     TypeError, ["'k_cache'", "float32"]),
    ("v_shape", lambda c: dict(v_cache=c.v_cache[:, :2]), ValueError, ["'v_cache'", "shape"]),
    ("head_dim", lambda c: dict(q=torch.randn(4, 4, 8)), ValueError, ["'q'", "head_dim 16"]),
    ("gqa", lambda c: dict(q=torch.randn(4, 3, 16)), ValueError, ["'q'", "divisible", "num_kv_heads=2"]),
    ("table_int64", lambda c: dict(block_table=c.block_table.long()), TypeError, ["'block_table'", "int32"]),
    ("seq_lens_int64", lambda c: dict(seq_lens=c.seq_lens.long()), TypeError, ["'seq_lens'", "int32"]),
    ("cu_int64", lambda c: dict(cu_seqlens_q=c.cu_seqlens_q.long()), TypeError, ["'cu_seqlens_q'", "int32"]),
    ("cu_len", lambda c: dict(cu_seqlens_q=c.cu_seqlens_q[:2]), ValueError, ["'cu_seqlens_q'", "(3,)"]),
    ("table_rows", lambda c: dict(block_table=c.block_table[:1]), ValueError, ["'block_table'", "2 rows"]),
    ("max_q_tensor", lambda c: dict(max_seqlen_q=torch.tensor(3)), TypeError, ["'max_seqlen_q'", "host int"]),
    ("max_q_small", lambda c: dict(max_seqlen_q=2), ValueError, ["'max_seqlen_q'", "longest query"]),
    ("max_k_small", lambda c: dict(max_seqlen_k=19), ValueError, ["'max_seqlen_k'", "longest sequence"]),
    ("scale_nan", lambda c: dict(scale=math.nan), ValueError, ["'scale'", "finite"]),
    ("scale_neg", lambda c: dict(scale=-1.0), ValueError, ["'scale'", "> 0"]),
    ("window_neg", lambda c: dict(window=-3), ValueError, ["'window'", "positive"]),
    ("window_zero", lambda c: dict(window=0), ValueError, ["'window'", "positive"]),
    ("window_float", lambda c: dict(window=2.5), TypeError, ["'window'", "int"]),
    ("softcap_zero", lambda c: dict(softcap=0.0), ValueError, ["'softcap'", "> 0"]),
    ("softcap_inf", lambda c: dict(softcap=math.inf), ValueError, ["'softcap'", "finite"]),
    ("sink_shape", lambda c: dict(sink_logits=torch.zeros(3)), ValueError, ["'sink_logits'", "(4,)"]),
    ("sink_dtype", lambda c: dict(sink_logits=torch.zeros(4, dtype=torch.float16)), TypeError, ["'sink_logits'", "float32"]),
    ("kscale_alone", lambda c: dict(k_scale=torch.tensor(1.0)), ValueError, ["'v_scale'"]),
    ("kscale_shape", lambda c: dict(k_scale=torch.ones(3), v_scale=torch.ones(3)), ValueError, ["'k_scale'", "(2,)"]),
    ("out_shape", lambda c: dict(out=torch.empty(4, 4, 8)), ValueError, ["'out'", "shape"]),
    ("out_dtype", lambda c: dict(out=torch.empty(4, 4, 16, dtype=torch.float16)), TypeError, ["'out'", "float32"]),
    ("causal_int", lambda c: dict(causal=1), TypeError, ["'causal'", "bool"]),
    ("cu_start", lambda c: dict(cu_seqlens_q=torch.tensor([1, 3, 4], dtype=torch.int32)), ValueError, ["'cu_seqlens_q'", "starting at 0"]),
    ("cu_decreasing", lambda c: dict(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, ["'cu_seqlens_q'", "non-decreasing"]),
    ("cu_end", lambda c: dict(cu_seqlens_q=torch.tensor([0, 2, 3], dtype=torch.int32), max_seqlen_q=3), ValueError, ["'cu_seqlens_q'", "q.shape[0]=4"]),
    ("seq_shorter_than_q", lambda c: dict(seq_lens=torch.tensor([2, 20], dtype=torch.int32)), ValueError, ["'seq_lens'", "query count"]),
    ("seq_over_capacity", lambda c: dict(seq_lens=torch.tensor([10, 25], dtype=torch.int32), max_seqlen_k=25), ValueError, ["'seq_lens'", "capacity"]),
    ("table_negative", lambda c: dict(block_table=_table(c, 0, 1, -1)), ValueError, ["'block_table'", "block_table[0, 1]=-1"]),
    ("table_too_big", lambda c: dict(block_table=_table(c, 1, 4, 99)), ValueError, ["'block_table'", "num_blocks"]),
    # Device mismatches (the meta device stands in for any other device): every tensor argument
    # must be on q's device.
    ("dev_q", lambda c: dict(q=c.q.to("meta")), ValueError, ["'k_cache'", "on device meta (like q)", "got cpu"]),
    ("dev_k_cache", lambda c: dict(k_cache=c.k_cache.to("meta")), ValueError, ["'k_cache'", "on device cpu (like q)", "got meta"]),
    ("dev_v_cache", lambda c: dict(v_cache=c.v_cache.to("meta")), ValueError, ["'v_cache'", "on device cpu (like q)", "got meta"]),
    ("dev_block_table", lambda c: dict(block_table=c.block_table.to("meta")), ValueError, ["'block_table'", "on device cpu (like q)"]),
    ("dev_seq_lens", lambda c: dict(seq_lens=c.seq_lens.to("meta")), ValueError, ["'seq_lens'", "on device cpu (like q)"]),
    ("dev_cu_seqlens_q", lambda c: dict(cu_seqlens_q=c.cu_seqlens_q.to("meta")), ValueError, ["'cu_seqlens_q'", "on device cpu (like q)"]),
    ("dev_sink", lambda c: dict(sink_logits=torch.randn(4, device="meta")), ValueError, ["'sink_logits'", "on device cpu (like q)"]),
    ("dev_out", lambda c: dict(out=torch.empty(4, 4, 16, device="meta")), ValueError, ["'out'", "on device cpu (like q)"]),
    ("dev_kscale", lambda c: dict(k_scale=torch.ones(2, device="meta"), v_scale=torch.ones(2)), TypeError, ["'k_scale'", "on cpu"]),
]


@pytest.mark.parametrize("name,build,exc,words", PAGED_BAD, ids=[p[0] for p in PAGED_BAD])
def test_paged_attention_rejects(name, build, exc, words):
    case = base()
    out = torch.full_like(case.q, 7.0)
    args = call_args(case, **build(case))
    args.setdefault("out", out)
    watched = [case.k_cache, case.v_cache, case.block_table, case.seq_lens, out]
    before = snapshot(*watched)
    with pytest.raises(exc) as info:
        kvmem.paged_attention(**args)
    msg = str(info.value)
    assert msg.startswith("paged_attention: argument"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert_unchanged(before, watched)


def test_unneeded_table_entries_are_not_checked_or_read():
    """-1 beyond a sequence's blocks and before its window is valid (and never read)."""
    case = make_case([1], [20], num_heads=2, num_kv_heads=1, head_dim=8, block_size=4, window=5, seed=2)
    assert (case.block_table[0, :3] == -1).all()  # blocks before the window were freed
    out = kvmem.paged_attention(*case.args(), **case.kwargs)
    torch.testing.assert_close(out, case.reference()[0])


def test_check_false_skips_value_checks_only():
    case = base()
    kvmem.paged_attention(**call_args(case, max_seqlen_q=99), check=False)  # bounds may be loose
    with pytest.raises(TypeError, match="'block_table'"):
        kvmem.paged_attention(**call_args(case, block_table=case.block_table.long()), check=False)


def cw_base():
    k_cache = torch.full((4, 4, 2, 8), math.nan)
    v_cache = torch.full((4, 4, 2, 8), math.nan)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([0, 5, -1, 9, 15])
    return k, v, k_cache, v_cache, slots


CW_BAD = [
    ("k_dtype", lambda k, v, kc, vc, s: (k.int(), v, kc, vc, s), TypeError, ["'k'", "float32"]),
    ("v_dtype", lambda k, v, kc, vc, s: (k.half(), v, kc, vc, s), TypeError, ["'v'", "float16"]),
    ("fp8_no_scale", lambda k, v, kc, vc, s: (k, v, kc.to(torch.float8_e5m2), vc.to(torch.float8_e5m2), s), TypeError,
     ["'k_cache'", "float32"]),
    ("v_heads", lambda k, v, kc, vc, s: (k, v[:, :1], kc, vc, s), ValueError, ["'v'", "shape"]),
    ("k_tokens", lambda k, v, kc, vc, s: (k[:4], v[:4], kc, vc, s), ValueError, ["'slot_mapping'", "(4,)"]),
    ("slot_int32", lambda k, v, kc, vc, s: (k, v, kc, vc, s.int()), TypeError, ["'slot_mapping'", "int64"]),
    ("slot_range", lambda k, v, kc, vc, s: (k, v, kc, vc, torch.tensor([0, 5, -1, 9, 16])), ValueError, ["'slot_mapping'", "slot_mapping[4]=16"]),
    ("slot_below", lambda k, v, kc, vc, s: (k, v, kc, vc, torch.tensor([0, 5, -2, 9, 1])), ValueError, ["'slot_mapping'", "[-1,"]),
    ("slot_dup", lambda k, v, kc, vc, s: (k, v, kc, vc, torch.tensor([0, 5, -1, 5, 1])), ValueError, ["'slot_mapping'", "duplicate"]),
    ("cache_shape", lambda k, v, kc, vc, s: (k, v, kc, vc[:2], s), ValueError, ["'v_cache'", "shape"]),
    # Device mismatches: everything on k_cache's device (meta stands in for any other device).
    ("dev_k", lambda k, v, kc, vc, s: (k.to("meta"), v, kc, vc, s), ValueError, ["'k'", "on device cpu (like k_cache)", "got meta"]),
    ("dev_v", lambda k, v, kc, vc, s: (k, v.to("meta"), kc, vc, s), ValueError, ["'v'", "on device cpu (like k_cache)", "got meta"]),
    ("dev_slots", lambda k, v, kc, vc, s: (k, v, kc, vc, s.to("meta")), ValueError, ["'slot_mapping'", "on device cpu (like k_cache)"]),
    ("dev_v_cache", lambda k, v, kc, vc, s: (k, v, kc, vc.to("meta"), s), ValueError, ["'v_cache'", "on device cpu (like k_cache)"]),
    ("dev_k_cache", lambda k, v, kc, vc, s: (k, v, kc.to("meta"), vc, s), ValueError, ["'v_cache'", "on device meta (like k_cache)", "got cpu"]),
]


@pytest.mark.parametrize("name,build,exc,words", CW_BAD, ids=[p[0] for p in CW_BAD])
def test_cache_write_rejects(name, build, exc, words):
    k, v, k_cache, v_cache, slots = cw_base()
    before = snapshot(k_cache, v_cache)
    with pytest.raises(exc) as info:
        kvmem.cache_write(*build(k, v, k_cache, v_cache, slots))
    msg = str(info.value)
    assert msg.startswith("cache_write: argument"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert_unchanged(before, [k_cache, v_cache])


def test_merge_states_rejects():
    o, l = torch.randn(3, 2, 4), torch.randn(3, 2)
    with pytest.raises(TypeError, match="'lse_b'.*float32"):
        kvmem.merge_states(o, l, o, l.half())
    with pytest.raises(ValueError, match="'out_b'.*shape"):
        kvmem.merge_states(o, l, o[:2], l)
    with pytest.raises(TypeError, match="'out_b'"):
        kvmem.merge_states(o, l, o.half(), l)


MERGE_DEVICE_BAD = [  # (which argument goes to the meta device, the argument the error names, words)
    ("out_b", "out_b", "on device cpu (like out_a)"),
    ("lse_a", "lse_a", "on device cpu (like out_a)"),
    ("lse_b", "lse_b", "on device cpu (like out_a)"),
    ("out_a", "out_b", "on device meta (like out_a)"),
]


@pytest.mark.parametrize("moved,named,words", MERGE_DEVICE_BAD, ids=[m[0] for m in MERGE_DEVICE_BAD])
def test_merge_states_rejects_device_mismatch(moved, named, words):
    args = dict(out_a=torch.randn(3, 2, 4), lse_a=torch.randn(3, 2), out_b=torch.randn(3, 2, 4), lse_b=torch.randn(3, 2))
    before = snapshot(*args.values())
    originals = list(args.values())
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError) as info:
        kvmem.merge_states(**args)
    msg = str(info.value)
    assert msg.startswith(f"merge_states: argument '{named}'"), msg
    assert words in msg, (words, msg)
    assert_unchanged(before, originals)
