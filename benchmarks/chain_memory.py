"""Model chains on CPU (issue 14): time to first token with prefix reuse vs recomputing the prompt.

SmolLM2-135M-Instruct, fp32. Two copies of the model: ``kvmem.patch(m)`` (recomputes every prompt)
and ``kvmem.patch(m, prefix_cache=True)``. Two cases, both sides measured interleaved in one run
(plain, reuse, plain, reuse, ...), median of ``--reps``:

* ``chat turn 2``: turn 1 = a ``--prompt``-token prompt and a ``--answer``-token greedy answer
  (generated once by the reuse model, so its blocks are registered); turn 2 = turn 1's ids + a
  ``--message``-token message, a different message every repetition (so each repetition reuses
  turn 1 only, as a real turn 2 would).
* ``shared prefix``: a ``--prefix``-token prefix (system prompt + document) cached by one call;
  every later call = the prefix + a different 20-token question.
* ``batch``: a first call (nothing cached: a new prefix every repetition) of ``--rows`` rows that
  share a ``--batch-prefix``-token prefix, each with its own 20-token question; with reuse, a
  one-row pre-pass computes the prefix once and the batch prefill only the questions (compute
  dedup), and the rows hold the prefix's blocks once (storage dedup: KV held printed).

Time to first token = the wall time of ``generate(max_new_tokens=1)``. Outputs are checked equal.

    python benchmarks/chain_memory.py            # 1k prompt, 400-token answer, 20-token message; 4k prefix
    python benchmarks/chain_memory.py --quick    # small sizes (a smoke run)
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvmem  # noqa: E402


def ttft(model, ids):
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    return time.perf_counter() - t, out


def interleaved(plain, reuse, prompts):
    tp, tr, fr = [], [], []
    for ids in prompts:
        a, out_p = ttft(plain, ids)
        b, out_r = ttft(reuse, ids)
        assert torch.equal(out_p, out_r), "outputs differ with and without reuse"
        tp.append(a)
        tr.append(b)
        fr.append(reuse._kvmem_prefix_report.reused_fraction)
    return statistics.median(tp), statistics.median(tr), min(tp), max(tp), min(tr), max(tr), statistics.median(fr)


def show(name, r):
    mp, mr, lp, hp, lr, hr, fr = r
    print(f"{name:<44} recompute {mp * 1e3:8.0f} ms ({lp * 1e3:.0f}-{hp * 1e3:.0f})   reuse {mr * 1e3:7.0f} ms "
          f"({lr * 1e3:.0f}-{hr * 1e3:.0f})   {mp / mr:6.1f}x   reused {100 * fr:.1f}% of the prompt", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--answer", type=int, default=400)
    p.add_argument("--message", type=int, default=20)
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--batch-prefix", type=int, default=2048)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    a = p.parse_args(argv)
    if a.quick:
        a.prompt, a.answer, a.prefix, a.batch_prefix, a.reps = 200, 40, 600, 300, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from kvmem.generate_demo import _find_model

    path, gguf = _find_model(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **({"gguf_file": gguf} if gguf else {}))
    plain, reuse = model.eval(), copy.deepcopy(model).eval()
    kvmem.patch(plain)
    kvmem.patch(reuse, prefix_cache=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, vocab, (1, n), generator=g)  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)

    turn1 = rand(a.prompt)
    t = time.perf_counter()
    with torch.no_grad():
        first = reuse.generate(input_ids=turn1, attention_mask=torch.ones_like(turn1), max_new_tokens=a.answer,
                               min_new_tokens=a.answer, do_sample=False)
    print(f"turn 1: {a.prompt}-token prompt + {first.shape[1] - a.prompt}-token answer in "
          f"{time.perf_counter() - t:.1f} s (registered {reuse._kvmem_prefix_report.registered_tokens} tokens)",
          flush=True)
    turns = [torch.cat([first, rand(a.message)], 1) for _ in range(a.reps)]
    show(f"chat turn 2 ({turns[0].shape[1]} tokens)", interleaved(plain, reuse, turns))

    prefix = rand(a.prefix)
    ttft(reuse, torch.cat([prefix, rand(20)], 1))  # caches the prefix
    calls = [torch.cat([prefix, rand(20)], 1) for _ in range(a.reps)]
    show(f"shared {a.prefix}-token prefix, 2nd call", interleaved(plain, reuse, calls))
    batches = [torch.cat([rand(a.batch_prefix).expand(a.rows, -1),
                          torch.cat([rand(20) for _ in range(a.rows)])], 1) for _ in range(a.reps)]
    show(f"batch of {a.rows} sharing a {a.batch_prefix}-token prefix, 1st call", interleaved(plain, reuse, batches))
    rep = reuse._kvmem_prefix_report
    print(f"  pre-pass computed {rep.prepass_tokens} tokens once; {rep.shared_blocks} blocks shared; KV held "
          f"{rep.kv_bytes_held / 2**20:.1f} MiB for {a.rows} rows", flush=True)
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
