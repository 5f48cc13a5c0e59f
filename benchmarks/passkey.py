"""Passkey retrieval on SmolLM2-135M (real weights), resumable, one JSON per trial.

    python benchmarks/passkey.py --method hf --lengths 4096 8192 --seeds 100-119
    python benchmarks/passkey.py --method extend --lengths 16384 32768 --seeds 100-129
    python benchmarks/passkey.py --summary            # the table of every method/length run so far

Methods: ``hf`` (unpatched model, HF full attention), ``paged`` (kvmem.patch, no bank),
``extend`` (kvmem memory bank, extend mode, defaults), ``streaming`` (the bank with top_k=0:
block-granular StreamingLLM), ``exact`` (memory bank with original positions). ``--multi`` asks for
one of three different keys. Documents as memory: ``document`` (the haystack with the key is a
document encoded into a ``kvmem.MemoryBank``, extend defaults; a short prompt without it asks for
the key; build time and bank bytes recorded) and ``hf-document`` (the same document in the prompt
before the same question, HF full attention); ``--lengths`` is then the document's length. Seeds 0-9 are for tuning; report seeds >= 100 only.

Each trial writes ``<out>/<method>[-multi]_<length>_<seed>.json`` (the answer, the key, the depth,
the needle recall when the bank reports it, the time); a trial whose file exists is skipped, so an
interrupted run resumes where it stopped. The haystack files' sha256 are pinned in
``<out>/haystack.json`` by the first run and checked by every later one.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvmem.bench import passkey  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "passkey")


def _seeds(spec):
    out = []
    for part in spec:
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def load_model(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmem.generate_demo import SMOLLM2_GGUF, _find_model

    path, gguf = _find_model(None)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    model.eval()
    return model, tok


def parse_overrides(items):
    """``["top_k=32", "summary=box"]`` -> ``{"top_k": 32, "summary": "box"}`` (ints where they parse)."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"passkey: --set takes name=value, got {item!r}")
        out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def override_tag(overrides):
    return "".join(f"[{k}={v}]" for k, v in sorted(overrides.items()))


def configure(model, method, overrides=None):
    """Patch ``model`` for ``method`` (hf: leave it alone), with ``MemoryConfig`` fields
    ``overrides`` (tuning: ``--set``). Returns the patched or original model."""
    overrides = dict(overrides or {})
    import kvmem

    kvmem.unpatch(model)
    if method in ("hf", "hf-document", "paged") and overrides:
        raise SystemExit(f"passkey: --set applies to the memory-bank methods, not {method!r}")
    if method in ("hf", "hf-document"):
        return model
    if method == "paged":
        return kvmem.patch(model)
    cfg_cls = getattr(kvmem, "MemoryConfig", None)
    if cfg_cls is None:
        raise SystemExit(f"passkey: method {method!r} needs kvmem.MemoryConfig (the memory bank)")
    if method in ("extend", "document"):
        cfg = cfg_cls(**{"mode": "extend", **overrides})
    elif method == "streaming":
        cfg = cfg_cls(**{"mode": "extend", "top_k": 0, **overrides})
    elif method == "exact":
        cfg = cfg_cls(**{"mode": "exact", **overrides})
    else:
        raise SystemExit(f"passkey: unknown method {method!r}")
    return kvmem.patch(model, memory_bank=cfg)


def needle_recall(model, trial):
    """Fraction of memory layers in which some KV head selected a needle block at the first answer
    token, when the bank reports its selections (None otherwise)."""
    report = getattr(model, "_kvmem_memory_report", None)
    if report is None:
        return None
    try:
        return report.needle_recall(trial.needle_span)
    except Exception:
        return None


def key_margin(tok, key, scores):
    """How close the first answer step came to starting the key: the first token of ``" " + key``
    (how the model writes it after "The pass key is"; for SmolLM2 the lone space before the digits,
    so this is the digits-or-words decision), scored at the greedy completion's first step.
    ``key_first_prob``: its softmax probability; ``key_first_rank``: 0 when it was the argmax. A
    graded companion of right/wrong: a near miss and a distant one differ."""
    target = tok.encode(" " + key, add_special_tokens=False)[0]
    logits = scores[0][0].float()
    prob = torch.softmax(logits, dim=-1)[target].item()
    rank = int((logits > logits[target]).sum().item())
    return {"key_first_token": int(target), "key_first_prob": prob, "key_first_rank": rank}


def run_document_trial(model, tok, haystack_ids, method, length, seed, max_new_tokens=8, overrides=None):
    """``document``: the document (``length`` tokens) into a ``kvmem.MemoryBank``, asked by a short
    prompt without it; ``hf-document``: the same document in the prompt, before the same question,
    HF full attention."""
    import kvmem

    trial = passkey.build_document_trial(tok, haystack_ids, length, seed)
    build, bank_bytes, recall = None, None, None
    if method == "document":
        t0 = time.perf_counter()
        bank = kvmem.MemoryBank.from_documents(model, [trial.document], progress=False)
        build = time.perf_counter() - t0
        bank_bytes = bank.nbytes()
        kvmem.set_banks(model, [bank])
        ids = torch.tensor([trial.input_ids])
    else:
        ids = torch.tensor([trial.document + trial.input_ids])
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id, output_scores=True,
                                 return_dict_in_generate=True)
    finally:
        if method == "document":
            kvmem.set_banks(model, [])
    seconds = time.perf_counter() - t0
    if method == "document":
        bs = bank.block_size
        recall = model._kvmem_memory_report.attached_recall(
            range(trial.needle_span[0] // bs, (trial.needle_span[1] - 1) // bs + 1))
    out = gen.sequences
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"method": method, "length": len(trial.document), "target_length": length, "seed": seed,
            "multi": False, "depth": trial.depth, "key": trial.key, "answer": answer,
            "correct": passkey.is_correct(answer, trial.key), "needle_span": list(trial.needle_span),
            "needle_recall": recall, **key_margin(tok, trial.key, gen.scores),
            "seconds": seconds + (build or 0.0), "answer_seconds": seconds,
            "build_seconds": build, "bank_bytes": bank_bytes, "prompt_tokens": int(ids.shape[1]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "overrides": dict(overrides or {})}


def run_trial(model, tok, haystack_ids, method, length, seed, multi, max_new_tokens=8, overrides=None):
    if method in ("document", "hf-document"):
        if multi:
            raise SystemExit("passkey: --multi is not available with the document methods")
        return run_document_trial(model, tok, haystack_ids, method, length, seed, max_new_tokens, overrides)
    trial = passkey.build_trial(tok, haystack_ids, length, seed, multi=multi)
    ids = torch.tensor([trial.input_ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id, output_scores=True,
                             return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    out = gen.sequences
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"method": method, "length": len(trial.input_ids), "target_length": length, "seed": seed,
            "multi": multi, "depth": trial.depth, "key": trial.key, "answer": answer,
            "correct": passkey.is_correct(answer, trial.key), "needle_span": list(trial.needle_span),
            "needle_recall": needle_recall(model, trial), **key_margin(tok, trial.key, gen.scores),
            "seconds": seconds,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "overrides": dict(overrides or {})}


def _median(xs):
    return f"{statistics.median(xs):.2f}" if xs else "-"


def summary(out_dir, tuning=False):
    rows = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*_*_*.json"))):
        with open(path) as f:
            r = json.load(f)
        if (r.get("seed", 0) < 100) != tuning:
            continue  # tuning seeds are never reported (--tuning: only they are, for tuning)
        key = (r["method"] + ("-multi" if r.get("multi") else "") + override_tag(r.get("overrides", {})),
               r["target_length"])
        rows.setdefault(key, []).append(r)
    lines = ["| method | length | trials | accuracy | Wilson 95 % | needle recall | s/trial |",
             "|---|---|---|---|---|---|---|"]
    for (method, length), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ok = sum(r["correct"] for r in rs)
        lo, hi = passkey.wilson(ok, len(rs))
        rec = [r["needle_recall"] for r in rs if r.get("needle_recall") is not None]
        rec_s = f"{100 * sum(rec) / len(rec):.0f} %" if rec else "-"
        secs = sum(r["seconds"] for r in rs) / len(rs)
        lines.append(f"| {method} | {length} | {len(rs)} | {ok}/{len(rs)} = {100 * ok / len(rs):.0f} % | "
                     f"{100 * lo:.0f}-{100 * hi:.0f} % | {rec_s} | {secs:.1f} |")
    for (method, length), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        built = [r for r in rs if r.get("build_seconds")]
        if built:
            per = sum(r["build_seconds"] / r["length"] for r in built) / len(built) * 1000
            mib = sum(r["bank_bytes"] / r["length"] for r in built) / len(built) * 1000 / 2**20
            lines.append(f"\n{method} {length}: bank build {per:.2f} s and {mib:.1f} MiB (in memory) per 1k document "
                         f"tokens, answer {sum(r['answer_seconds'] for r in built) / len(built):.1f} s")
        margin = [r for r in rs if r.get("key_first_prob") is not None]
        if margin:
            right = [r["key_first_prob"] for r in margin if r["correct"]]
            wrong = [r["key_first_prob"] for r in margin if not r["correct"]]
            lines.append(f"\n{method} {length}: p(key's first token) at the first answer step, median over "
                         f"{len(margin)} trials: right {_median(right)} ({len(right)}), "
                         f"wrong {_median(wrong)} ({len(wrong)})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="hf", choices=["hf", "paged", "extend", "streaming", "exact", "document",
                                                           "hf-document"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--seeds", nargs="+", default=["100-119"], help="e.g. 100-129 or 0 1 2")
    ap.add_argument("--multi", action="store_true", help="three keys in the haystack, ask for one")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="MemoryConfig fields for tuning (seeds 0-9), e.g. --set block_size=64 top_k=32; "
                         "the trial files are tagged with them")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--summary", action="store_true", help="print the results table and exit")
    ap.add_argument("--tuning", action="store_true", help="with --summary: the tuning seeds' (< 100) table instead")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.out, args.tuning))
        return
    os.makedirs(args.out, exist_ok=True)
    pin_path = os.path.join(args.out, "haystack.json")
    pinned = json.load(open(pin_path)) if os.path.exists(pin_path) else None
    text, hashes = passkey.haystack_text(pinned)
    if pinned is None:
        with open(pin_path + ".tmp", "w") as f:
            json.dump(hashes, f, indent=1)
        os.replace(pin_path + ".tmp", pin_path)
    model, tok = load_model()
    haystack_ids = tok.encode(text, add_special_tokens=False)
    overrides = parse_overrides(args.set)
    model = configure(model, args.method, overrides)
    tag = args.method + ("-multi" if args.multi else "") + override_tag(overrides)
    for length in args.lengths:
        for seed in _seeds(args.seeds):
            path = os.path.join(args.out, f"{tag}_{length}_{seed}.json")
            if os.path.exists(path):
                continue
            r = run_trial(model, tok, haystack_ids, args.method, length, seed, args.multi, overrides=overrides)
            with open(path + ".tmp", "w") as f:
                json.dump(r, f, indent=1)
            os.replace(path + ".tmp", path)
            print(f"{tag} len={length} seed={seed} depth={r['depth']:.2f} key={r['key']} "
                  f"answer={r['answer']!r} {'OK' if r['correct'] else 'WRONG'} {r['seconds']:.1f}s", flush=True)
    print(summary(args.out))


if __name__ == "__main__":
    main()
