"""A user-defined memory-bank selection policy in a few lines, run through ``generate()``.

The policy scores bank blocks by their mean key (the default rule's scores, group rule included)
and always keeps the row's *first* bank block (the text right after the attention sinks: a system
prompt, say). It is called once per segment group per memory layer per step, tensors in and
tensors out; kvmem checks its output before any attention kernel runs. Runs on a tiny
random-weight Llama (no download) and checks, from the memory report, that every KV head of every
memory layer selected that first block at the end of the prompt.

    python examples/custom_policy.py
"""

import math

import torch
import transformers

import kvmem
from kvmem.memory import HeavyHitters, SelectionPolicy, policies


class KeepFirstBlock(SelectionPolicy):
    """Mean-key top-k, but the first bank block is always among the selected."""

    summary = "mean"  # the summary pool this policy reads (written when a block enters the bank)

    def select(self, q, summaries, bank_table, bank_lens, query_index, top_k, *, scale, mass=None):
        scores = policies.block_scores(q, summaries, bank_table, bank_lens, query_index, summary="mean", scale=scale)
        first = scores[..., 0]
        scores[..., 0] = torch.where(first > -math.inf, torch.full_like(first, math.inf), first)  # live: first
        return policies.top_k_positions(scores, top_k)  # [n, Hkv, top_k] int32, ascending, -1 padded


torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=1024, pad_token_id=0)
model = transformers.LlamaForCausalLM(config).eval()
bank = kvmem.MemoryConfig(mode="extend", sink_tokens=16, window=32, block_size=16, top_k=2, chunk_size=32,
                          selection=KeepFirstBlock(),
                          eviction=HeavyHitters(budget_blocks=6))  # H2O-style: banks keep their 6 heaviest blocks
kvmem.patch(model, memory_bank=bank)
ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
report = model._kvmem_memory_report
first_page = report.page_tables[0][bank.sink_tokens // bank.block_size]  # the row's first bank block
every = all(first_page in head for layer in report.selected for head in report.selected_pages(layer))
print("generated:", out[0, ids.shape[1]:].tolist())
print(f"first bank block (page {first_page}) selected by every KV head of every memory layer:",
      "YES" if every else "NO")
kvmem.unpatch(model)
assert every
