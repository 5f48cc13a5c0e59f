"""Quality of the KV cache dtypes: SmolLM2-135M (real weights, fp32 CPU), fp32 / bf16 / fp8 caches.

    nice -n 10 python benchmarks/kv_quality.py                  # everything not measured yet
    python benchmarks/kv_quality.py --only ppl                  # perplexity rows first
    python benchmarks/kv_quality.py --table                     # print the markdown table
    python benchmarks/kv_quality.py --only ppl greedy --center-keys   # fp8 rows with key centring

Resumable: one JSON per result under ``benchmarks/results/kv_quality/`` (``ppl_<dtype>_<N>.json``,
``greedy_<dtype>.json``, ``encode_<dtype>.json``); a result already there is skipped. The table is
written to ``benchmarks/results/kv_quality/README.md``.

The text: the Debian licence texts GPL-2 then GFDL-1.3 (``/usr/share/common-licenses``), each
pinned by sha256 (``TEXT_SHA256``; a different file stops the run), the first ``--tokens`` tokens.

Rows
----
* **perplexity** (``ppl``): ``kvmem.patch(model, kv_cache_dtype=...)`` (default scale rule for
  fp8: each layer's first write, the first chunk, fixes its per-head scales with headroom 2), then
  a *chunked prefill* through one ``PagedKVCache``: the text is fed ``--chunk`` tokens at a time
  (``model.model(chunk, cache=...)``), and every chunk's attention reads the keys/values *from
  the cache pages* (``kvmem.layer.run_layer`` writes the chunk's k/v with ``cache_write`` first,
  then ``paged_attention`` reads every key, the chunk's own included, back from the pages,
  dequantised). So the perplexity really is that of the quantised cache: no query ever sees an
  un-quantised key or value, not even those of its own chunk (a plain single forward through
  HF's own attention would attend over un-quantised k/v; kvmem's does not, but chunking also
  makes the later chunks read earlier chunks' pages like decode steps do).
  ppl = exp(mean NLL of tokens 1..N-1).
* **greedy agreement** (``greedy``): 20 prompts of 256 tokens taken from the text at evenly spread
  offsets, one batch, 64 new tokens (greedy ``generate()``); per dtype vs the fp32 cache: the
  fraction of generated tokens before the first divergence (mean over prompts) and the fraction
  of prompts whose 64 tokens are all identical. The fp8 scales come from the batch's prefill.
* **centred keys** (``--center-keys``: ``ppl_<fp8>_centred_<N>``, ``greedy_<fp8>_centred``): the same
  rows with ``kv_center_keys=True`` (the pages store ``k - mu``, ``mu`` the first write's mean key;
  ``kvmem.cache.scales``); without the flag the fp8 rows are measured with ``kv_center_keys=False``.
* **K or V alone** (``split``, a diagnostic): the perplexity pass with an fp32 cache whose keys
  (or values) only are round-tripped through the e4m3 encoding as they are written (same scale
  rule), to tell which of the two costs the perplexity.
* **encoding error** (``encode``): the relative error ``|dequant(encode(x / s)) * s - x| / |x|``
  (L2 over each layer and head, mean over layers) of SmolLM2's real keys (post-RoPE) and values
  over the text, with scales fixed by the default rule from the first 256 tokens; and the
  fraction of elements clamped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kvmem  # noqa: E402
from kvmem.cache.scales import DEFAULT_HEADROOM, KV_DTYPE_NAMES, scales_from_absmax  # noqa: E402
from kvmem.ops._common import encode  # noqa: E402
from passkey import load_model  # noqa: E402

OUT = os.path.join(HERE, "results", "kv_quality")
LICENCE_DIR = "/usr/share/common-licenses"
TEXT_FILES = ("GPL-2", "GFDL-1.3")
TEXT_SHA256 = {"GPL-2": "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643",
               "GFDL-1.3": "110535522396708cea37c72a802c5e7e81391139f5f7985631c93ef242b206a4"}
DTYPES = {"fp32": None, "bf16": "bf16", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
LOGIT_CHUNK = 512


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def text_and_hashes(pin=True):
    parts, hashes = [], {}
    for name in TEXT_FILES:
        path = os.path.join(LICENCE_DIR, name)
        digest = sha256_file(path)
        if pin and TEXT_SHA256.get(name) not in (None, digest):
            raise SystemExit(f"kv_quality: {path} has sha256 {digest}, pinned {TEXT_SHA256[name]}; the results would "
                             f"not be comparable (update TEXT_SHA256 only with all results remeasured)")
        hashes[name] = digest
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n\n".join(parts), hashes


def machine():
    import transformers

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def save(name, data):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"kv_quality: wrote {os.path.relpath(path, os.path.dirname(HERE))}", flush=True)


def load(name):
    path = os.path.join(OUT, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


#: ``--center-keys``: fp8 rows with key centring (``kvmem.cache.scales``, "Key centring"), written as
#: ``<kind>_<dtype>_centred``; without it the fp8 rows are measured with centring off
CENTER = False


def row_name(dtype_name):
    """The result name of a dtype: ``fp8_e4m3_centred`` for a centred fp8 row."""
    return dtype_name + ("_centred" if CENTER and dtype_name.startswith("fp8") else "")


def patched(model, dtype_name):
    kvmem.patch(model, kv_cache_dtype=DTYPES[dtype_name], kv_center_keys=CENTER and dtype_name.startswith("fp8"))
    return model


# ------------------------------------------------------------------------------------------ perplexity
def chunked_nll(model, ids, chunk):
    """[N - 1] NLL of tokens 1..N-1: the text fed ``chunk`` tokens at a time through one PagedKVCache."""
    from kvmem.integrations.hf.compat import cache_kwarg
    from kvmem.integrations.hf.generate import make_cache
    from kvmem.integrations.hf.options import options_of

    N = ids.shape[1]
    cache = make_cache(options_of(model), model, max_batch_size=1, max_cache_len=N)
    nll = []
    with torch.inference_mode():
        for c0 in range(0, N, chunk):
            part = ids[:, c0:c0 + chunk]
            mask = torch.ones(1, c0 + part.shape[1], dtype=torch.long)
            hidden = model.model(input_ids=part, attention_mask=mask, use_cache=True,
                                 position_ids=torch.arange(c0, c0 + part.shape[1])[None],
                                 **{cache_kwarg(model): cache}).last_hidden_state[0]
            targets = ids[0, c0 + 1:c0 + part.shape[1] + 1]
            for t0 in range(0, targets.shape[0], LOGIT_CHUNK):
                logits = model.lm_head(hidden[t0:t0 + LOGIT_CHUNK][: targets.shape[0] - t0]).float()
                nll.append(torch.nn.functional.cross_entropy(logits, targets[t0:t0 + LOGIT_CHUNK], reduction="none"))
    dtype = cache.kv_cache_dtype
    scales = cache.kv_scales
    return torch.cat(nll), str(dtype), (None if scales is None else scales.as_dict())


def run_ppl(model, ids, dtype_name, chunk, hashes):
    name = f"ppl_{row_name(dtype_name)}_{ids.shape[1]}"
    if load(name) is not None:
        return
    t0 = time.time()
    patched(model, dtype_name)
    try:
        nll, pool_dtype, scales = chunked_nll(model, ids, chunk)
    finally:
        kvmem.unpatch(model)
    save(name, {"kind": "ppl", "dtype": row_name(dtype_name), "pool_dtype": pool_dtype, "tokens": ids.shape[1],
                "chunk": chunk,
                "ppl": math.exp(nll.mean().item()), "nll": nll.mean().item(), "seconds": time.time() - t0,
                "headroom": DEFAULT_HEADROOM if scales else None, "scales": scales, "text_sha256": hashes,
                "machine": machine()})


def run_split(model, ids, chunk, hashes, fmt_name="fp8_e4m3"):
    """``ppl_<fmt>_<k|v>only_<N>``: fp32 pools, only K (or V) round-tripped through ``encode``."""
    from kvmem.ops.kernel_ops import KernelOps

    fmt, orig = KV_DTYPE_NAMES[fmt_name], KernelOps.cache_write
    for which in ("k", "v"):
        name = f"ppl_{fmt_name}_{which}only_{ids.shape[1]}"
        if load(name) is not None:
            continue
        fixed = {}  # pool -> (k_scale, v_scale): each layer's first write fixes them, as the rule

        def cache_write(self, k, v, k_cache, v_cache, slot_mapping, **kw):
            if id(k_cache) not in fixed:
                fixed[id(k_cache)] = tuple(scales_from_absmax(x.abs().amax(dim=(0, 2)), DEFAULT_HEADROOM, fmt)
                                           .view(1, -1, 1) for x in (k, v))
            ks, vs = fixed[id(k_cache)]
            if which == "k":
                k = encode(k / ks, fmt).float() * ks
            else:
                v = encode(v / vs, fmt).float() * vs
            return orig(self, k, v, k_cache, v_cache, slot_mapping, **kw)

        t0 = time.time()
        KernelOps.cache_write = cache_write
        patched(model, "fp32")
        try:
            nll, _, _ = chunked_nll(model, ids, chunk)
        finally:
            kvmem.unpatch(model)
            KernelOps.cache_write = orig
        save(name, {"kind": "ppl", "dtype": f"{fmt_name} {which.upper()} only", "pool_dtype": "torch.float32",
                    "tokens": ids.shape[1], "chunk": chunk, "ppl": math.exp(nll.mean().item()),
                    "nll": nll.mean().item(), "seconds": time.time() - t0, "headroom": DEFAULT_HEADROOM,
                    "scales": None, "text_sha256": hashes, "machine": machine()})


# ------------------------------------------------------------------------------------------ greedy
def prompts_from(ids, n, length):
    N = ids.shape[1]
    offsets = [i * (N - length) // max(1, n - 1) for i in range(n)]
    return torch.stack([ids[0, o:o + length] for o in offsets]), offsets


def run_greedy(model, prompts, offsets, dtype_name, new_tokens, hashes):
    name = f"greedy_{row_name(dtype_name)}"
    if load(name) is not None:
        return
    t0 = time.time()
    patched(model, dtype_name)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    finally:
        kvmem.unpatch(model)
    gen = out[:, prompts.shape[1]:].tolist()
    save(name, {"kind": "greedy", "dtype": row_name(dtype_name), "prompts": prompts.shape[0],
                "prompt_tokens": prompts.shape[1],
                "new_tokens": new_tokens, "offsets": offsets, "generated": gen, "seconds": time.time() - t0,
                "text_sha256": hashes, "machine": machine()})


def agreement(gen, ref):
    """(mean fraction of tokens before the first divergence, fraction of identical continuations)."""
    before, same = [], 0
    for a, b in zip(gen, ref):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        before.append(k / len(b))
        same += int(k == len(b))
    return sum(before) / len(before), same / len(ref)


# ------------------------------------------------------------------------------------------ encoding
def run_encode(model, ids, calib_tokens, hashes):
    todo = [d for d in ("fp8_e4m3", "fp8_e5m2") if load(f"encode_{d}") is None]
    if not todo:
        return
    import transformers

    cache = transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, past_key_values=cache)
    for d in todo:
        fmt = KV_DTYPE_NAMES[d]
        errs, clamped, n = {"k": [], "v": []}, {"k": 0, "v": 0}, {"k": 0, "v": 0}
        for layer in cache.layers:
            for kind, x in (("k", layer.keys), ("v", layer.values)):
                x = x[0].float()  # [H, S, D]
                s = scales_from_absmax(x[:, :calib_tokens].abs().amax(dim=(1, 2)), DEFAULT_HEADROOM, fmt).view(-1, 1, 1)
                q = encode(x / s, fmt).float() * s
                errs[kind].append(float((q - x).norm() / x.norm()))
                clamped[kind] += int((x.abs() > s * torch.finfo(fmt).max).sum())
                n[kind] += x.numel()
        save(f"encode_{d}", {"kind": "encode", "dtype": d, "tokens": ids.shape[1], "calib_tokens": calib_tokens,
                             "headroom": DEFAULT_HEADROOM,
                             "rel_err_k": sum(errs["k"]) / len(errs["k"]), "rel_err_v": sum(errs["v"]) / len(errs["v"]),
                             "max_layer_rel_err_k": max(errs["k"]), "max_layer_rel_err_v": max(errs["v"]),
                             "clamped_k": clamped["k"] / n["k"], "clamped_v": clamped["v"] / n["v"],
                             "text_sha256": hashes, "machine": machine()})


# ------------------------------------------------------------------------------------------ table
def table():
    lines = ["# KV cache dtype quality: SmolLM2-135M, fp32 CPU, GPL-2 + GFDL-1.3", "",
             "`benchmarks/kv_quality.py` (see its docstring for the method). fp8 scales: the default rule "
             f"(each layer's first write fixes per-KV-head scales, headroom {DEFAULT_HEADROOM}). Rows `fp8_*` "
             "store the keys as they are (`kv_center_keys=False`); rows `fp8_*_centred` (`--center-keys`) store "
             "`k - mu`, `mu` the first write's mean key per (layer, KV head, channel) (`kvmem.cache.scales`, "
             "\"Key centring\").", ""]
    ppl = {}
    for fn in sorted(os.listdir(OUT)) if os.path.isdir(OUT) else []:
        if fn.startswith("ppl_") and fn.endswith(".json"):
            r = load(fn[:-5])
            ppl.setdefault(r["tokens"], {})[r["dtype"]] = r
    if ppl:
        lines += ["| KV cache | tokens | chunk | perplexity | vs fp32 | seconds |", "|---|---|---|---|---|---|"]
        for n, rows in sorted(ppl.items()):
            ref = rows.get("fp32")
            for d in list(DTYPES) + sorted(set(rows) - set(DTYPES)):
                if d in rows:
                    r = rows[d]
                    rel = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.3f} %" if ref else "-"
                    lines.append(f"| {d} | {n} | {r['chunk']} | {r['ppl']:.4f} | {rel} | {r['seconds']:.0f} |")
        lines.append("")
    ref = load("greedy_fp32")
    rows = [(d, load(f"greedy_{d}")) for d in list(DTYPES) + [d + "_centred" for d in DTYPES if d.startswith("fp8")]
            if d != "fp32"]
    if ref and any(r for _, r in rows):
        lines += [f"Greedy agreement vs the fp32 cache: {ref['prompts']} prompts x {ref['prompt_tokens']} tokens, "
                  f"{ref['new_tokens']} new tokens.", "",
                  "| KV cache | tokens before first divergence | identical continuations |", "|---|---|---|"]
        for d, r in rows:
            if r:
                before, same = agreement(r["generated"], ref["generated"])
                lines.append(f"| {d} | {100 * before:.1f} % | {100 * same:.0f} % |")
        lines.append("")
    enc = [(d, load(f"encode_{d}")) for d in ("fp8_e4m3", "fp8_e5m2")]
    if any(r for _, r in enc):
        lines += ["Encoding error on the real keys (post-RoPE) / values, scales from the first "
                  f"{next(r for _, r in enc if r)['calib_tokens']} tokens:", "",
                  "| format | rel. error K | rel. error V | worst layer K / V | clamped K / V |", "|---|---|---|---|---|"]
        for d, r in enc:
            if r:
                lines.append(f"| {d} | {100 * r['rel_err_k']:.2f} % | {100 * r['rel_err_v']:.2f} % | "
                             f"{100 * r['max_layer_rel_err_k']:.2f} / {100 * r['max_layer_rel_err_v']:.2f} % | "
                             f"{r['clamped_k']:.1e} / {r['clamped_v']:.1e} |")
        lines.append("")
    some = next((load(fn[:-5]) for fn in sorted(os.listdir(OUT)) if fn.endswith(".json")), None) \
        if os.path.isdir(OUT) else None
    if some:
        lines += ["Text files (sha256):", ""] + [f"- `{k}`: `{v}`" for k, v in some["text_sha256"].items()] + [""]
    text = "\n".join(lines)
    if os.path.isdir(OUT):
        with open(os.path.join(OUT, "README.md"), "w") as f:
            f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="perplexity text length")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk of the perplexity pass")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--only", nargs="+", default=["ppl", "greedy", "encode", "split"],
                    choices=["ppl", "greedy", "encode", "split"])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/kv_quality)")
    ap.add_argument("--table", action="store_true", help="print the markdown table and exit")
    ap.add_argument("--center-keys", action="store_true", help="fp8 rows with key centring (<dtype>_centred)")
    args = ap.parse_args(argv)
    if args.out:
        global OUT
        OUT = os.path.abspath(args.out)
    global CENTER
    CENTER = args.center_keys
    if args.table:
        print(table())
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("kvmem").setLevel(logging.ERROR)  # the reference fallback's one log line per op
    text, hashes = text_and_hashes()
    model, tok = load_model(torch.float32)
    ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"kv_quality: the text has {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    ids = ids[:, :args.tokens]
    if "ppl" in args.only:
        for d in args.dtypes:
            run_ppl(model, ids, d, args.chunk, hashes)
            print(table(), flush=True)
    if "split" in args.only:
        run_split(model, ids, args.chunk, hashes)
    if "encode" in args.only:
        run_encode(model, ids, 256, hashes)
    if "greedy" in args.only:
        prompts, offsets = prompts_from(ids, args.prompts, args.prompt_tokens)
        for d in ["fp32"] + [d for d in args.dtypes if d != "fp32"]:
            run_greedy(model, prompts, offsets, d, args.new_tokens, hashes)
    print(table())


if __name__ == "__main__":
    main()
