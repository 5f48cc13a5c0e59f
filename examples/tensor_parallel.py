"""kvmem under tensor parallelism: a Hugging Face model sharded with ``tp_plan="auto"``, patched.

Each rank holds its share of the attention heads and a paged KV cache of only its KV heads
(KV bytes per rank = total / ranks); HF's plan does the communication (gloo on CPUs, NCCL on
GPUs), kvmem adds none. Greedy output is checked against the unpatched sharded model on every rank.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/tensor_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 4 examples/tensor_parallel.py --model meta-llama/Llama-3.1-8B  # GPUs, NCCL

Without ``--model`` every rank builds the same random-weight Llama (8 query / 4 KV heads). The
number of ranks must divide the model's ``num_key_value_heads``.
"""

import argparse
import os
import tempfile


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint (default: a small random-weight Llama)")
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--backend", default="auto", help="kvmem backend (auto, cpu, cuda, triton, reference)")
    return p.parse_args()


def random_llama(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)  # the same weights on every rank
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def main() -> None:
    args = parse_args()
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import kvmem

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_llama(os.path.join(tmp, "llama"))
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype).eval()
    rank, ranks = dist.get_rank(), dist.get_world_size()
    vocab = model.config.vocab_size
    ids = (torch.arange(args.prompt_tokens) * 7919 % (vocab - 1) + 1).view(1, -1).to(model.device)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        kvmem.patch(model, backend=args.backend)
        out = model.generate(ids, return_dict_in_generate=True, **kw)
    cache = out.past_key_values
    same = torch.equal(out.sequences, ref)
    print(f"rank {rank}/{ranks}: {cache.num_kv_heads} of {model.config.num_key_value_heads} KV heads, "
          f"{cache.kv_bytes_held()} KV bytes held, identical to the unpatched sharded model: {same}", flush=True)
    everyone = [None] * ranks
    dist.all_gather_object(everyone, (same, out.sequences.tolist()))
    if rank == 0:
        ok = all(s for s, _ in everyone) and all(t == everyone[0][1] for _, t in everyone)
        print(f"kvmem under tensor parallelism ({ranks} ranks): outputs identical on every rank: "
              f"{'YES' if ok else 'NO'}")
        if not ok:
            raise SystemExit(1)
    dist.barrier()


if __name__ == "__main__":
    main()
