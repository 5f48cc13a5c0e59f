"""kvmem.nn.MemoryAttention over a KVCacheManager: eager prefill + decode, and a decode step that
compiles with torch.compile(fullgraph=True) given fixed-shape inputs (no graph break, one frame)."""

import math
import types

import pytest
import torch

import kvmem
from kvmem.cache import KVCacheManager, LayerGroupSpec
from kvmem.cache.metadata import StepMetadata
from kvmem.memory import RowBanks
from kvmem.memory.step import MemoryStep, SegmentGroup, plan_memory_step
from kvmem.nn import MemoryAttention, static_memory_step
from kvmem.ops import reference

HQ, HKV, D, BS, W = 6, 2, 16, 4, 16  # W: blocks per row
MODEL = types.SimpleNamespace(max_position_embeddings=1024, rope_theta=10000.0, num_hidden_layers=1)


def _setup(mode):
    cfg = kvmem.MemoryConfig(mode=mode, sink_tokens=4, window=8, top_k=2, chunk_size=8).resolve(MODEL, BS)
    mgr = KVCacheManager(48, BS, [LayerGroupSpec("full", (0,))], max_blocks_per_seq=W)
    pools = mgr.make_pools(HKV, D, torch.float32, fill=0.0)
    attn = MemoryAttention(HQ, HKV, D, config=cfg, layer_idx=0)
    banks = RowBanks(sink_blocks=cfg.sink_blocks, window=cfg.window, block_size=BS, batch=2)
    rope = None
    if mode == "extend":
        inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        ang = torch.arange(256, dtype=torch.float64)[:, None] * inv[None]
        rope = torch.cat([ang.cos(), ang.sin()], -1).float()
    return cfg, mgr, pools, attn, banks, attn.summary_pool(48), rope


def _step(mgr, banks, cfg, q_lens, **kw):
    before = [mgr.seq_len(s) for s in "ab"]
    plan = mgr.plan(["a", "b"], q_lens)
    tables = [mgr.block_table(s, "full") for s in "ab"]
    ms = plan_memory_step(banks, tables, before, q_lens, top_k=cfg.top_k, chunk_size=cfg.chunk_size, **kw)
    return plan.for_layer(0), ms


@pytest.mark.parametrize("mode", ["exact", "extend"])
def test_memory_attention_top_k_covering_is_full_attention(mode):
    """Chunked prefill (rows of 30 and 13 tokens, chunk 8) and decode: with top_k >= the bank, the
    module equals causal paged attention over every key (extend: compaction is the identity)."""
    cfg, mgr, pools, attn, banks, summaries, rope = _setup(mode)
    cfg = cfg.__class__(**{**cfg.__dict__, "top_k": 16})
    attn.config = cfg
    for s in "ab":
        mgr.add_sequence(s)
    g = torch.Generator().manual_seed(0)
    for q_lens in ([30, 13], [1, 1], [1, 1], [5, 1]):
        md, ms = _step(mgr, banks, cfg, q_lens)
        T = sum(q_lens)
        q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
        out = attn(q, k, v, *pools[0], md, ms, summaries, rope_cos_sin=rope)
        kw, qr = {}, q
        if rope is not None:
            pos = torch.cat([torch.arange(int(L) - n, int(L)) for L, n in zip(md.seq_lens, q_lens)])
            qr, kw = reference.apply_rotary(q, rope, pos), dict(rope_cos_sin=rope)
        full, _ = reference.paged_attention(qr, *pools[0], md.block_table, md.seq_lens, md.cu_seqlens_q,
                                            md.max_seqlen_q, md.max_seqlen_k, scale=1 / math.sqrt(D), **kw)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert banks.bank_lens().tolist() == [(32 - 8) // 4 - 1, 0]  # bank = blocks [1, w0) of the last step


@pytest.mark.parametrize("mode", ["exact", "extend"])
def test_memory_attention_decode_step_compiles_fullgraph(mode):
    import torch._dynamo.testing

    cfg, mgr, pools, attn, banks, summaries, rope = _setup(mode)
    for s in "ab":
        mgr.add_sequence(s)
    g = torch.Generator().manual_seed(1)
    md, ms = _step(mgr, banks, cfg, [27, 13])
    attn(torch.randn(40, HQ, D, generator=g), torch.randn(40, HKV, D, generator=g),
         torch.randn(40, HKV, D, generator=g), *pools[0], md, ms, summaries, rope_cos_sin=rope)
    max_k = cfg.sink_tokens + cfg.top_k * BS + cfg.window + BS + 1

    def step(q, k, v, kc, vc, summ, table, lens, cu, slots, evicted, bank_table, rows, seg_cu, seg_lens, w0,
             bank_lens, qidx, n_sel, pos):
        md = StepMetadata(table, lens, cu, slots, max_seqlen_q=1, max_seqlen_k=W * BS)
        group = SegmentGroup((0, 2), rows, seg_cu, seg_lens, w0, bank_lens, qidx, n_sel, pos, 1, max_k)
        return attn(q, k, v, kc, vc, md, MemoryStep(evicted, bank_table, [group], [(0, 0), (0, 1)]), summ,
                    rope_cos_sin=rope)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(12):  # row a evicts a block every 4 steps, row b too
        md, ms = _step(mgr, banks, cfg, [1, 1], bank_width=W, pad_summarise_to=2)
        ms = static_memory_step(ms, max_seqlen_q=1, max_seqlen_k=max_k)
        md = kvmem.nn.static_metadata(md, max_seqlen_q=1, max_seqlen_k=W * BS)
        q, k, v = (torch.randn(2, h, D, generator=g) for h in (HQ, HKV, HKV))
        kc, vc, summ = pools[0][0].clone(), pools[0][1].clone(), summaries.clone()
        ref = attn(q, k, v, kc, vc, md, ms, summ, rope_cos_sin=rope)
        (grp,) = ms.groups
        out = compiled(q, k, v, *pools[0], summaries, md.block_table, md.seq_lens, md.cu_seqlens_q,
                       md.slot_mapping, ms.summarise, ms.bank_table, grp.rows, grp.cu_seqlens_q, grp.seq_lens,
                       grp.window_start, grp.bank_lens, grp.query_index, grp.num_selected, grp.positions)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        assert torch.equal(pools[0][0], kc) and torch.equal(summaries[:-1].nan_to_num(), summ[:-1].nan_to_num())
    assert counter.frame_count == 1
    assert banks.bank_lens().tolist() == [(38 - 8) // 4 - 1, (24 - 8) // 4 - 1]


@pytest.mark.parametrize("rot", [None, 64, 32])
@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1, 1], [100, 37, 5]), ([16, 9, 1], [120, 60, 17])])
def test_kernels_attend_equals_the_reference(rot, q_lens, kv_lens):
    """The seam's attend (extend mode: rotated scratch pool; exact: compacted paged tables) equals
    memory_attention's reference with a random, pruning selection (compaction not the identity),
    GQA 3, softcap and sink logits."""
    from memory_cases import make_memory_case

    from kvmem.memory import kernels
    from kvmem.ops.memory_attention import memory_attention

    case = make_memory_case(q_lens, kv_lens, num_heads=6, num_kv_heads=2, top_k=2, rope_rot_dim=rot,
                            softcap=8.0, sink_logits=True, seed=3)
    want = memory_attention(*case.args(), **case.memory_kwargs())
    kw = case.kwargs
    got = kernels.attend(*case.args(), sink_blocks=case.sink_blocks, window_start=case.window_start,
                         bank_table=case.bank_table, selected=case.selected, scale=1 / math.sqrt(64),
                         softcap=kw["softcap"], sink_logits=kw["sink_logits"], rope_cos_sin=kw.get("rope_cos_sin"))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("summary", ["minmax", "box", "reps", "mean"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("pages", [60, 20])
def test_batched_select_equals_the_reference(summary, group, pages):
    """Batched selection (no host sync) = the reference (random scores: no near-ties), with
    empty banks, rows that select nothing (query_index -1) and top_k beyond the bank. 60 pages >
    4 rows x 12 bank slots: each row's summaries gathered; 20 pages: the whole pool scored once,
    then gathered per row (both paths of ``batched.block_scores``)."""
    from kvmem.ops.memory_select import batched, reference as select_reference

    g = torch.Generator().manual_seed(group)
    hkv, d = 2, 32
    summaries = select_reference.compute_summaries(torch.randn(pages, 16, hkv, d, generator=g),
                                                   torch.arange(pages), summary=summary)
    q = torch.randn(9, hkv * group, d, generator=g)
    cu = torch.tensor([0, 3, 4, 4, 9], dtype=torch.int32)
    bank_table = torch.stack([torch.randperm(pages, generator=g)[:12] for _ in range(4)]).to(torch.int32)
    bank_lens = torch.tensor([12, 5, 3, 0], dtype=torch.int32)
    index = torch.tensor([1, 3, -1, 4], dtype=torch.int32)
    for top_k in (0, 4, 20):
        want = select_reference.memory_select(q, summaries, bank_table, bank_lens, cu, top_k, query_index=index,
                                              summary=summary)
        got = batched.memory_select(q, summaries, bank_table, bank_lens, index, top_k, summary=summary)
        assert torch.equal(got, want)
