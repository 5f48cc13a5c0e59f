"""Passkey retrieval on SmolLM2-135M-Instruct, with or without kvmem's memory bank.

A random 5-digit key hidden in a natural-text haystack (``kvmem.bench.passkey``) at a given depth;
the greedy answer is right when it contains the key. With a bank, the needle recall is the fraction
of memory layers whose selection held the needle at the first answer token.

    python examples/passkey.py --length 3000 --window 512 --top-k 64 --chunk-size 256 --trials 2
    python examples/passkey.py --length 16384 --depth spread --trials 4 --bank extend
    python examples/passkey.py --length 4096 --bank none          # HF full attention

``--bank``: ``none`` (the unpatched model), ``extend`` (pre-RoPE keys at compacted positions: past
the trained context), ``exact`` (original positions) or ``streaming`` (extend with top_k=0:
block-granular StreamingLLM). ``--top-k/--window/--sink-tokens/--chunk-size`` override the
defaults ``kvmem.MemoryConfig`` derives from the model. Trial i uses seed ``--seed + i``; seeds
0-9 are for tuning, the benchmark (``benchmarks/passkey.py``) reports seeds >= 100.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def depth_arg(text):
    if text == "spread":
        return text
    depth = float(text)
    if not 0.0 <= depth <= 1.0:
        raise argparse.ArgumentTypeError(f"--depth must be a fraction in [0, 1] or 'spread', got {text}")
    return depth


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=3000, help="prompt tokens (default 3000)")
    p.add_argument("--depth", type=depth_arg, default="spread",
                   help="the needle's depth: a fraction, or 'spread' (trial i at (i + 0.5) / trials)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--bank", default="extend", choices=["none", "extend", "exact", "streaming"])
    p.add_argument("--top-k", type=int, default=None, help="bank blocks selected per KV head")
    p.add_argument("--window", type=int, default=None, help="local-window tokens (whole blocks)")
    p.add_argument("--sink-tokens", type=int, default=None, help="attention-sink tokens (whole blocks)")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (queries)")
    p.add_argument("--seed", type=int, default=0, help="trial i uses seed + i")
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args(argv)
    if a.trials < 1 or a.length < 64:
        p.error("--trials must be >= 1 and --length >= 64")
    if a.bank == "none" and any(v is not None for v in (a.top_k, a.window, a.sink_tokens, a.chunk_size)):
        p.error("--top-k/--window/--sink-tokens/--chunk-size need a bank (--bank extend|exact|streaming)")
    if a.bank == "streaming" and a.top_k not in (None, 0):
        p.error("--bank streaming is top_k=0")
    return a


def memory_config(a):
    """The ``kvmem.MemoryConfig`` of ``--bank`` and the overrides (None for ``--bank none``)."""
    import kvmem

    if a.bank == "none":
        return None
    top_k = 0 if a.bank == "streaming" else a.top_k
    return kvmem.MemoryConfig(mode="exact" if a.bank == "exact" else "extend", top_k=top_k, window=a.window,
                              sink_tokens=a.sink_tokens, chunk_size=a.chunk_size)


def main(argv=None):
    a = parse(argv)
    import torch

    import kvmem
    from kvmem.bench import passkey
    from kvmem.generate_demo import load, require_transformers

    require_transformers("examples/passkey.py")
    model, tok, name = load(None, torch.float32, torch.device("cpu"))
    hay = tok.encode(passkey.haystack_text()[0], add_special_tokens=False)
    bank = memory_config(a)
    if bank is not None:
        c = bank.resolve(model.config, page_size=16)  # kvmem.patch's default page size
        kvmem.patch(model, memory_bank=bank)
        print(f"{name}: bank {a.bank}: {c.sink_tokens} sinks + top_k {c.top_k} blocks of {c.block_size} + "
              f"window {c.window}, chunk {c.chunk_size}")
    else:
        print(f"{name}: no bank (HF {model.config._attn_implementation}, full attention)")
    right, recalls = 0, []
    for i in range(a.trials):
        depth = (i + 0.5) / a.trials if a.depth == "spread" else a.depth
        trial = passkey.build_trial(tok, hay, a.length, a.seed + i, depth=depth)
        ids = torch.tensor([trial.input_ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        seconds = time.perf_counter() - t0
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        ok = passkey.is_correct(answer, trial.key)
        right += ok
        recall = None
        if bank is not None:
            recall = model._kvmem_memory_report.needle_recall(trial.needle_span)
            recalls.append(recall)
        rec = "" if recall is None else f" needle recall {100 * recall:.0f} %"
        print(f"trial {i}: seed {a.seed + i} {ids.shape[1]} tokens depth {depth:.2f} key {trial.key} "
              f"answer {answer!r} {'RIGHT' if ok else 'WRONG'}{rec} ({seconds:.1f} s)", flush=True)
    lo, hi = passkey.wilson(right, a.trials)
    print(f"accuracy {right}/{a.trials} = {100 * right / a.trials:.0f} % (Wilson 95 %: {100 * lo:.0f}-{100 * hi:.0f} %)")
    if recalls:
        print(f"mean needle recall {100 * sum(recalls) / len(recalls):.0f} %")
    kvmem.unpatch(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
