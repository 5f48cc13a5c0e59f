"""Perplexity of SmolLM2-135M (real weights, fp32 CPU) on a long natural text, with and without the bank.

    python benchmarks/perplexity.py                          # 4096 tokens, every method
    python benchmarks/perplexity.py --tokens 4096 8000 --methods hf exact
    python benchmarks/perplexity.py --table                  # rewrite the markdown table and exit

The text is the Debian licence texts (``kvmem.bench.passkey.haystack_text``: GPL-3, GFDL-1.3, ...,
each file pinned by sha256), its first ``N`` tokens. Perplexity is ``exp`` of the mean negative
log-likelihood of tokens ``1 .. N-1``, from **one forward over the whole text** with a fresh cache;
``ppl_last_quarter`` is the same over the targets at positions ``>= 3N/4`` (where the bank holds
most of the context). With the memory bank the forward is a chunked prefill (``chunk_size``
queries per chunk, selection once per sub-block of ``block_size`` queries with its first query),
so later tokens never steer an earlier query's selection: the perplexity is causal.

Methods (``--methods``):

* ``hf``: the unpatched model (HF full attention);
* ``paged``: ``kvmem.patch(model)``, no bank (must equal ``hf`` to ~1e-4 relative);
* ``exact``: ``kvmem.MemoryConfig(mode="exact", window=W, top_k=K)`` with original positions;
  by default ``W`` = N/8 (whole blocks) and ``K`` = W/16, so sinks + top_k*16 + window is about a
  quarter of the text, and a smaller ``K/4`` (``--exact`` overrides: ``W:K[:summary]`` items);
* ``extend``: ``kvmem.MemoryConfig(mode="extend")`` defaults, reported beside.

Results accumulate in ``--out`` (default ``benchmarks/results/perplexity_<UTC date>.json``; a run
whose key is already there is skipped, so an interrupted run resumes) and the markdown table is
written to ``benchmarks/results/perplexity.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from kvmem.bench import passkey  # noqa: E402
from passkey import load_model  # noqa: E402

RESULTS = os.path.join(HERE, "results")
TABLE = os.path.join(RESULTS, "perplexity.md")
LOGIT_CHUNK = 512  # lm_head rows at a time: the [N, vocab] fp32 logits are never held whole
SINK_TOKENS = 64
PAGE = 16


def exact_configs(n_tokens, spec):
    """``[(window, top_k, summary, chunk_size)]`` for ``exact`` at ``n_tokens`` (``spec``:
    ``W:K[:summary[:chunk]]`` items; chunk None = the default)."""
    if spec:
        out = []
        for item in spec:
            parts = item.split(":")
            out.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "minmax",
                        int(parts[3]) if len(parts) > 3 else None))
        return out
    window = max(PAGE, n_tokens // 8 // PAGE * PAGE)
    top_k = window // PAGE
    return [(window, top_k, "minmax", None), (window, max(1, top_k // 4), "minmax", None)]


def runs_for(methods, n_tokens, exact_spec):
    """``[(key, method, config dict or None)]`` of one text length."""
    out = []
    for method in methods:
        if method in ("hf", "paged"):
            out.append((f"{method}|{n_tokens}", method, None))
        elif method == "extend":
            out.append((f"extend|{n_tokens}", method, {"mode": "extend"}))
        elif method == "exact":
            for window, top_k, summary, chunk in exact_configs(n_tokens, exact_spec):
                cfg = {"mode": "exact", "sink_tokens": SINK_TOKENS, "window": window, "top_k": top_k,
                       "summary": summary, "chunk_size": chunk}
                tag = "" if chunk is None else f"|c{chunk}"
                out.append((f"exact|{n_tokens}|w{window}|k{top_k}|{summary}{tag}", method, cfg))
        else:
            raise SystemExit(f"perplexity: unknown method {method!r}")
    return out


def configure(model, method, cfg):
    """Patch ``model`` for ``method``; returns the resolved ``MemoryConfig`` (or None)."""
    import kvmem

    kvmem.unpatch(model)
    if method == "hf":
        return None
    if method == "paged":
        kvmem.patch(model)
        return None
    bank = kvmem.MemoryConfig(**cfg)
    kvmem.patch(model, memory_bank=bank)
    return bank.resolve(model.config, PAGE)


def token_nll(model, ids, patched):
    """[N - 1] fp32 NLL of tokens 1..N-1 from one forward of ``ids`` [1, N] (fresh kvmem cache when patched)."""
    kw = {}
    if patched:
        from kvmem.integrations.hf.compat import cache_kwarg
        from kvmem.integrations.hf.generate import make_cache
        from kvmem.integrations.hf.options import options_of

        kw[cache_kwarg(model)] = make_cache(options_of(model), model, max_batch_size=1,
                                            max_cache_len=ids.shape[1])
    else:
        kw["use_cache"] = False
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).last_hidden_state[0]
        targets = ids[0, 1:]
        nll = []
        for t0 in range(0, targets.shape[0], LOGIT_CHUNK):
            logits = model.lm_head(hidden[t0:t0 + LOGIT_CHUNK][: targets.shape[0] - t0]).float()
            nll.append(torch.nn.functional.cross_entropy(logits, targets[t0:t0 + LOGIT_CHUNK], reduction="none"))
    return torch.cat(nll)


def summarise(nll, n_tokens):
    """Perplexity of every target and of the targets at positions >= 3N/4."""
    last = nll[(3 * n_tokens) // 4 - 1:]  # nll[i] is the target at position i + 1
    return {"ppl": math.exp(nll.mean().item()), "nll": nll.mean().item(),
            "ppl_last_quarter": math.exp(last.mean().item()), "last_quarter_targets": int(last.numel())}


def model_name():
    from kvmem.generate_demo import SMOLLM2_GGUF

    return SMOLLM2_GGUF


def machine():
    import transformers

    return {"machine": platform.machine(), "processor": platform.processor() or "?", "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def table(data):
    """The markdown table of ``data`` (the results JSON)."""
    rows = data["runs"]
    hf = {r["tokens"]: r for r in rows.values() if r["method"] == "hf"}
    m = data["machine"]
    lines = [
        "# Perplexity: SmolLM2-135M, fp32 CPU, Debian licence texts",
        "",
        f"Model: {data.get('model', model_name())} (the weights `benchmarks/passkey.py` loads), de-quantized "
        "to fp32.",
        "",
        f"`benchmarks/perplexity.py`; machine: {m['machine']} ({m['cpus']} CPUs, shared), torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['threads']} threads. One forward over the first N tokens of "
        "the text (fresh cache); ppl = exp(mean NLL of tokens 1..N-1); last quarter = targets at positions "
        ">= 3N/4. The bank's prefill is chunked (`chunk_size` queries) with selection once per 16-query "
        "sub-block from its first query: causal. A query attends to the sinks, top_k selected blocks of 16 "
        "tokens and the keys from its chunk's window start to itself (window + up to a block + the chunk "
        "so far).",
        "",
        "| method | config | tokens | ppl | ppl last quarter | ratio to hf | ratio last quarter | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows, key=lambda k: (rows[k]["tokens"], ["hf", "paged", "exact", "extend"].index(rows[k]["method"]),
                                           -(rows[k].get("config") or {}).get("top_k", 0))):
        r = rows[key]
        ref = hf.get(r["tokens"])
        ratio = f"{r['ppl'] / ref['ppl']:.5f}" if ref else "-"
        ratio_q = f"{r['ppl_last_quarter'] / ref['ppl_last_quarter']:.5f}" if ref else "-"
        lines.append(f"| {r['method']} | {r['config_text']} | {r['tokens']} | {r['ppl']:.4f} | "
                     f"{r['ppl_last_quarter']:.4f} | {ratio} | {ratio_q} | {r['seconds']:.0f} |")
    lines += ["", "Text files (sha256):", ""]
    lines += [f"- `{name}`: `{digest}`" for name, digest in data["text_sha256"].items()]
    lines += ["", f"Results: `{os.path.relpath(data['path'], HERE)}`.", ""]
    return "\n".join(lines)


def config_text(method, cfg):
    if cfg is None:
        return "full attention" if method == "hf" else "kvmem.patch, no bank"
    parts = [f"{k}={cfg[k]}" for k in ("sink_tokens", "window", "top_k", "block_size", "chunk_size", "summary")
             if cfg.get(k) is not None]
    return ", ".join(parts)


def save(data, path):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    with open(TABLE + ".tmp", "w") as f:
        f.write(table(data))
    os.replace(TABLE + ".tmp", TABLE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--methods", nargs="+", default=["hf", "paged", "exact", "extend"],
                    choices=["hf", "paged", "exact", "extend"])
    ap.add_argument("--exact", nargs="+", default=None, metavar="W:K[:summary[:chunk]]",
                    help="exact-mode (window, top_k[, summary[, chunk_size]]) configs (default: window N/8 with "
                    "top_k N/128 and N/512, chunk 512)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/perplexity_<date>.json)")
    ap.add_argument("--table", action="store_true", help="rewrite the markdown table from --out and exit")
    args = ap.parse_args(argv)
    path = args.out or os.path.join(RESULTS, f"perplexity_{datetime.datetime.utcnow():%Y%m%d}.json")
    data = json.load(open(path)) if os.path.exists(path) else None
    if args.table:
        save(data, path)
        print(table(data))
        return
    text, hashes = passkey.haystack_text(data["text_sha256"] if data else None)
    if data is None:
        data = {"text_sha256": hashes, "machine": machine(), "runs": {}}
    data["path"] = path
    data.setdefault("model", model_name())
    model, tok = load_model()
    text_ids = tok.encode(text, add_special_tokens=False)
    for n_tokens in args.tokens:
        if n_tokens > len(text_ids):
            raise SystemExit(f"perplexity: the text has {len(text_ids)} tokens, fewer than {n_tokens}")
        ids = torch.tensor([text_ids[:n_tokens]])
        for key, method, cfg in runs_for(args.methods, n_tokens, args.exact):
            if key in data["runs"]:
                continue
            resolved = configure(model, method, cfg)
            t0 = time.perf_counter()
            nll = token_nll(model, ids, patched=method != "hf")
            seconds = time.perf_counter() - t0
            full = None if resolved is None else {k: getattr(resolved, k) for k in (
                "mode", "sink_tokens", "window", "block_size", "top_k", "summary", "chunk_size", "dense_layers")}
            row = {"method": method, "tokens": n_tokens, "config": full, "config_text": config_text(method, full),
                   "seconds": seconds, **summarise(nll, n_tokens)}
            data["runs"][key] = row
            save(data, path)
            print(f"{key}: ppl {row['ppl']:.4f}, last quarter {row['ppl_last_quarter']:.4f}, {seconds:.0f} s",
                  flush=True)
    import kvmem

    kvmem.unpatch(model)
    print(table(data))


if __name__ == "__main__":
    main()
