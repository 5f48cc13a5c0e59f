"""Tuning experiment (seeds < 100 only): extend-mode selection whose block score is the mean-key
score max-pooled over each block's +-R bank neighbours (so a selected block brings its neighbours:
the needle sentence can span two blocks). A custom ``SelectionPolicy``; prints one line per trial.

    python benchmarks/passkey_neighbours.py 1 16384 0 4     # R=1, 16k, tuning seeds 0 and 4
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import passkey as pk  # noqa: E402  (benchmarks/passkey.py)
import kvmem  # noqa: E402
from kvmem.bench import passkey  # noqa: E402
from kvmem.memory import SelectionPolicy, policies  # noqa: E402

R = 1


class Neighbours(SelectionPolicy):
    summary = "mean"
    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, *, scale, mass=None):
        s = policies.block_scores(q, summaries, bank_table, bank_lens, query_index, summary="mean", scale=scale)
        pooled = s
        for r in range(1, R + 1):
            left = F.pad(s[..., r:], (0, r), value=-math.inf)   # block j+r's score at j
            right = F.pad(s[..., :-r], (r, 0), value=-math.inf)  # block j-r's score at j
            pooled = torch.maximum(pooled, torch.maximum(left, right))
        pooled = torch.where(s > -math.inf, pooled, s)
        return policies.top_k_positions(pooled, top_k)


def main():
    global R
    R, L, seeds = int(sys.argv[1]), int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
    if any(s >= 100 for s in seeds):
        raise SystemExit("passkey_neighbours: tuning seeds only (< 100)")
    pinned = json.load(open(os.path.join(HERE, "results", "passkey", "haystack.json")))
    text, _ = passkey.haystack_text(pinned)
    model, tok = pk.load_model()
    hay = tok.encode(text, add_special_tokens=False)
    kvmem.patch(model, memory_bank=kvmem.MemoryConfig(mode="extend", selection=Neighbours()))
    for seed in seeds:
        trial = passkey.build_trial(tok, hay, L, seed)
        ids = torch.tensor([trial.input_ids])
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        ans = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"R={R} L={L} seed={seed} key={trial.key} depth={trial.depth:.2f} answer={ans!r} {'RIGHT' if passkey.is_correct(ans, trial.key) else 'WRONG'} {time.perf_counter()-t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
