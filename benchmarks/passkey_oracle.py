"""Diagnostic, not a product path: passkey trials with *exact* (oracle) block selection.

    python benchmarks/passkey_oracle.py 16384 0,3 [top_k=32 ...]      # tuning seeds only

Each bank block is scored by its best q.k over all of its keys (what no summary can beat), with
the group rule and top-k of kvmem.ops.memory_select, replacing the select stage of
kvmem.memory.stages for this process only. It separates the two ways extend mode can miss a
passkey: the selection (a summary ranks the needle low) and the read-out (the needle is selected
and the model still answers wrong). Prints one line per trial; writes nothing.
"""
import sys, time, math, torch
HERE = __import__("os").path.dirname(__import__("os").path.abspath(__file__))
sys.path.insert(0, __import__("os").path.dirname(HERE)); sys.path.insert(0, HERE)
import passkey as pkb
from kvmem.bench import passkey
from kvmem.memory import stages
from kvmem.ops.memory_select.reference import group_scores, top_k_positions

def exact_select(step):
    mem = stages._memory(step)
    cfg, ms = mem.config, mem.step
    chosen = []
    kc = step.k_cache
    for g in ms.groups:
        t0, t1 = g.tokens
        bank_table = ms.bank_table.index_select(0, g.rows)
        nseg, width = bank_table.shape
        Hq = step.q.shape[1]; Hkv = kc.shape[2]; G = Hq // Hkv
        scores = torch.full((nseg, Hq, width), -math.inf)
        qi = g.query_index.tolist(); bl = g.bank_lens.tolist()
        for s in range(nseg):
            if qi[s] < 0 or bl[s] == 0: continue
            n = bl[s]
            keys = kc[bank_table[s, :n].long()].float()  # [n, bs, Hkv, D]
            q = step.q[t0 + qi[s]].float().reshape(Hkv, G, -1)  # [Hkv, G, D]
            sc = torch.einsum("hgd,nthd->hgnt", q, keys).amax(-1).reshape(Hq, n)
            scores[s, :, :n] = sc * step.attention.scale
        sel = top_k_positions(group_scores(scores, Hkv), cfg.top_k)
        chosen.append((bank_table, sel))
    step.context.selections = chosen

stages.select = exact_select
stages.MEMORY_STAGES = (stages.MEMORY_STAGES[0], stages.evict, exact_select, stages.attend)
import kvmem.integrations.hf.memory as hfm
hfm.MEMORY_STAGES = stages.MEMORY_STAGES
length = int(sys.argv[1]); seeds = [int(x) for x in sys.argv[2].split(",")]
if any(s >= 100 for s in seeds):
    raise SystemExit("passkey_oracle: tuning seeds only (< 100)")
overrides = pkb.parse_overrides(sys.argv[3:])
model, tok = pkb.load_model()
text, _ = passkey.haystack_text()
hay = tok(text, add_special_tokens=False).input_ids
pkb.configure(model, "extend", overrides)
for seed in seeds:
    r = pkb.run_trial(model, tok, hay, "extend", length, seed, False, overrides=overrides)
    print("oracle", overrides, length, seed, repr(r["answer"]), r["key"], r["correct"], r["needle_recall"], f"{r['seconds']:.0f}s", flush=True)
