"""Tuning experiment (seeds < 100 only): extend mode with InfLLM's *fixed-distance* positions for the
selected bank blocks instead of kvmem's compaction. Not a product path: it swaps the attend stage
of ``kvmem.memory.stages`` for this process only; prints one line per trial, writes nothing.

    python benchmarks/passkey_positions.py 16384 0,1,3,4            # fixed distance, tuning seeds
    python benchmarks/passkey_positions.py 16384 0,1,3,4 compact    # the default rule, same harness

Compaction (the default, ``kvmem.ops.memory_attention`` docstring) places the i-th selected block's
token o at ``S + i * bs + o``: the selected blocks read as one stitched text before the window.
``fixed`` places *every* selected key at one position, the one just before the window
(``S + n_sel * bs - 1``): the model sees the bank as an unordered set of tokens at one distance
from the local text, as InfLLM does. Queries, sinks and the window keep their compacted positions;
only the keys' RoPE table rows of the selected region change (one table per segment group: every
segment of a group must have the same ``n_sel``, else the group runs segment by segment).

Each trial line has the answer, right/wrong, needle recall and p(key's first token) at the first
answer step (``benchmarks/passkey.py``'s graded companion of right/wrong).
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import passkey as pkb  # noqa: E402  (benchmarks/passkey.py)
from kvmem.bench import passkey  # noqa: E402
from kvmem.memory import kernels, stages  # noqa: E402


def _fixed_table(table: torch.Tensor, sink_len: int, n_sel_tokens: int) -> torch.Tensor:
    idx = torch.arange(table.shape[0], device=table.device)
    if n_sel_tokens:
        idx[sink_len:sink_len + n_sel_tokens] = sink_len + n_sel_tokens - 1
    return table.index_select(0, idx)


def fixed_attend(step) -> None:
    """``stages.attend`` with the selected keys' RoPE rows all at the position before the window."""
    mem = stages._memory(step)
    cfg, ms, a, md = mem.config, mem.step, step.attention, step.metadata
    out = torch.empty_like(step.q, memory_format=torch.contiguous_format)
    bs, sink_len = cfg.block_size, cfg.sink_blocks * cfg.block_size
    for g, (bank_table, selected) in zip(ms.groups, step.context.selections):
        t0 = g.tokens[0]
        n_sel = g.num_selected.tolist()
        cu = g.cu_seqlens_q.tolist()
        parts = [range(len(n_sel))] if len(set(n_sel)) == 1 else [range(s, s + 1) for s in range(len(n_sel))]
        for part in parts:
            s0, s1 = part[0], part[-1] + 1
            rows = slice(s0, s1)
            a0, a1 = t0 + cu[s0], t0 + cu[s1]
            q = step.q[a0:a1]
            pos = g.positions[cu[s0]:cu[s1]]
            q = kernels.rotate(q, mem.rope_cos_sin, pos)
            table = _fixed_table(mem.rope_cos_sin, sink_len, n_sel[s0] * bs)
            cu_part = g.cu_seqlens_q[s0:s1 + 1] - g.cu_seqlens_q[s0]
            q_lens = [cu[i + 1] - cu[i] for i in part]
            kernels.attend(q, step.k_cache, step.v_cache, md.block_table.index_select(0, g.rows[rows]),
                           g.seq_lens[rows], cu_part, max(q_lens), g.max_seqlen_k, sink_blocks=cfg.sink_blocks,
                           window_start=g.window_start[rows], bank_table=bank_table[rows],
                           selected=selected[rows], scale=a.scale, softcap=a.softcap, sink_logits=a.sink_logits,
                           rope_cos_sin=table, out=out[a0:a1], k_scale=step.k_scale, v_scale=step.v_scale)
    step.out = out


def main():
    length, seeds = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
    rule = sys.argv[3] if len(sys.argv) > 3 else "fixed"
    if any(s >= 100 for s in seeds):
        raise SystemExit("passkey_positions: tuning seeds only (< 100)")
    if rule not in ("fixed", "compact"):
        raise SystemExit(f"passkey_positions: rule must be fixed or compact, got {rule!r}")
    if rule == "fixed":
        import kvmem.integrations.hf.memory as hfm

        stages.MEMORY_STAGES = (stages.write, stages.evict, stages.select, fixed_attend)
        hfm.MEMORY_STAGES = stages.MEMORY_STAGES
    model, tok = pkb.load_model()
    text, _ = passkey.haystack_text()
    hay = tok.encode(text, add_special_tokens=False)
    pkb.configure(model, "extend")
    for seed in seeds:
        r = pkb.run_trial(model, tok, hay, "extend", length, seed, False)
        print(f"{rule} L={length} seed={seed} key={r['key']} depth={r['depth']:.2f} answer={r['answer']!r} "
              f"{'RIGHT' if r['correct'] else 'WRONG'} recall={r['needle_recall']:.2f} "
              f"p_first={r['key_first_prob']:.3f} rank={r['key_first_rank']} {r['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
