"""Which block-selection rule finds the passkey's digits? An offline study on SmolLM2's real keys.

    python benchmarks/selection_rules.py capture --length 16384 --seed 3 --out /tmp/sel   # one prefill
    python benchmarks/selection_rules.py rank /tmp/sel/cap_*.pt                            # the table

``capture`` runs one extend-mode passkey prefill (``kvmem.MemoryConfig(mode="extend")`` defaults
plus ``--set`` overrides) and saves, per memory layer, the pre-RoPE query of the prompt's last
token and the pre-RoPE keys of every page before the window (a few hundred MB, outside the repo).
``rank`` scores every bank block under each rule, as ``memory_select`` would for that query, and
reports the rank of the best block holding a digit of the key, per (layer, KV head). The
**retrieval heads** are those where the exact rule (the block's best ``q.k`` over all its keys,
which no summary can beat) ranks a digit block in its top 8: the heads that can read the key back.
Rules: ``exact``, ``minmax`` (Quest), ``box`` (ArkVale), ``mean`` (the mean key), ``reps`` (the two
keys farthest from the mean), ``halves`` (the means of the two half-blocks); each aggregated over
the GQA group by the plain max of the scores (``max``) or by the group rule of
``kvmem.ops.memory_select`` (``lse``: the max of per-head log-probabilities). Tuning seeds only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def capture(args):
    import passkey as pkb  # benchmarks/passkey.py

    from kvmem.bench import passkey
    from kvmem.integrations.hf import memory as hfmem

    model, tok = pkb.load_model()
    text, _ = passkey.haystack_text()
    hay = tok(text, add_special_tokens=False).input_ids
    trial = passkey.build_trial(tok, hay, args.length, args.seed)
    cap_q, cap_k = {}, {}
    unrotate, run = hfmem.CacheBank._unrotate, hfmem.CacheBank.run

    def unrotate_and_keep(self, step, layer_idx, query, key):
        q, k = unrotate(self, step, layer_idx, query, key)
        if q.shape[2] > 1:  # the prefill: its last token's pre-RoPE query
            cap_q[layer_idx] = q[0, :, -1].float().clone()
        return q, k

    def run_and_keep(self, ops, step, layer_idx, query, key, value, index, k_cache, v_cache, *a, **kw):
        cap_k[layer_idx] = k_cache
        return run(self, ops, step, layer_idx, query, key, value, index, k_cache, v_cache, *a, **kw)

    hfmem.CacheBank._unrotate, hfmem.CacheBank.run = unrotate_and_keep, run_and_keep
    pkb.configure(model, "extend", pkb.parse_overrides(args.set or []))
    ids = torch.tensor([trial.input_ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:])
    rep = model._kvmem_memory_report
    pt, bs, w0 = rep.page_tables[0], rep.block_size, rep.window_start[0]
    a, b = trial.needle_span
    digits = [t for t in range(a, b) if tok.decode([trial.input_ids[t]]).strip().isdigit()]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cap_{args.length}_{args.seed}.pt")
    torch.save({"q": cap_q, "K": {l: cap_k[l][torch.tensor(pt[:w0])].float().clone() for l in cap_q},
                "sb": rep.sink_blocks, "w0": w0, "bs": bs, "digits": digits, "span": [a, b],
                "answer": answer, "key": trial.key, "length": args.length, "seed": args.seed}, path)
    print(f"{path}: answer {answer!r} key {trial.key} ({time.perf_counter() - t0:.0f} s)")


def rule_scores(qg, keys):
    """Per-head scores ``[G, n]`` of the ``n`` bank blocks' keys ``[n, bs, D]`` under each rule."""
    centre = keys.mean(1)
    dist = (keys - centre[:, None]).norm(dim=-1)
    far = torch.gather(keys, 1, dist.topk(2, dim=1).indices[..., None].expand(-1, -1, keys.shape[-1]))
    halves = keys.reshape(keys.shape[0], 2, keys.shape[1] // 2, -1).mean(2)
    low, high = keys.amin(1), keys.amax(1)
    radius = (keys - centre[:, None]).abs().mean(1)
    return {
        "exact": torch.einsum("gd,ntd->gnt", qg, keys).amax(2),
        "minmax": torch.maximum(qg[:, None] * low[None], qg[:, None] * high[None]).sum(-1),
        "box": (qg[:, None] * centre[None] + qg.abs()[:, None] * radius[None]).sum(-1),
        "mean": qg @ centre.T,
        "reps": torch.einsum("gd,nrd->gnr", qg, far).amax(2),
        "halves": torch.einsum("gd,nrd->gnr", qg, halves).amax(2),
    }


AGGREGATES = {"max": lambda p: p.amax(0), "lse": lambda p: torch.log_softmax(p, dim=1).amax(0)}


def rank(args):
    rows = []
    for path in args.captures:
        d = torch.load(path)
        sb, w0, bs = d["sb"], d["w0"], d["bs"]
        blocks = sorted({t // bs for t in d["digits"] if sb <= t // bs < w0})
        if not blocks:
            print(f"{path}: the key's digits are not in the bank (sinks or window)")
            continue

        def best_rank(score):
            order = torch.argsort(-score).tolist()
            where = {j + sb: i for i, j in enumerate(order)}
            return min(where[x] for x in blocks)

        name = os.path.basename(path)
        parts = name[len("cap_"):-len(".pt")].split("_") if name.startswith("cap_") else [None, None]
        trial = {"capture": name, "length": d.get("length", int(parts[0])), "seed": d.get("seed", int(parts[1])),
                 "answer": d.get("answer"), "key": d.get("key"), "bank_blocks": w0 - sb, "digit_blocks": blocks,
                 "heads": []}
        for layer in sorted(d["q"]):
            q, K = d["q"][layer], d["K"][layer]
            hkv = K.shape[2]
            group = q.shape[0] // hkv
            for h in range(hkv):
                qg = q[h * group:(h + 1) * group] / math.sqrt(q.shape[1])
                per = rule_scores(qg, K[sb:, :, h])
                ranks = {f"{r}/{a}": best_rank(f(p)) for r, p in per.items() for a, f in AGGREGATES.items()}
                trial["heads"].append({"layer": layer, "kv_head": h, "retrieval": ranks["exact/lse"] < 8, **ranks})
        rows.append(trial)
    names = [k for k in rows[0]["heads"][0] if "/" in k] if rows else []
    print("| rule / group aggregate | " + " | ".join(f"{r['length']}-{r['seed']}: top 32 / 155 of {r['bank_blocks']}"
                                                    for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        cells = []
        for r in rows:
            ret = [h[name] for h in r["heads"] if h["retrieval"]]
            cells.append(f"{sum(x < 32 for x in ret)}/{len(ret)} / {sum(x < 155 for x in ret)}/{len(ret)}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--length", type=int, required=True)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--set", nargs="*", help="MemoryConfig overrides, as benchmarks/passkey.py --set")
    c.add_argument("--out", required=True, help="a folder outside the repo (the captures are large)")
    r = sub.add_parser("rank")
    r.add_argument("captures", nargs="+")
    r.add_argument("--json", help="write the per-head ranks here")
    args = ap.parse_args(argv)
    if args.seed >= 100 if args.cmd == "capture" else False:
        raise SystemExit("selection_rules: tuning seeds only (< 100)")
    capture(args) if args.cmd == "capture" else rank(args)


if __name__ == "__main__":
    main()
