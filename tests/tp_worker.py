"""Worker of tests/test_tensor_parallel.py: run under ``torchrun --nproc-per-node 2`` (gloo on CPU).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py MODELS OUT``:
loads the random-weight models saved under ``MODELS`` (``llama``: 8 query / 4 KV heads; ``qwen2``: a
full and a sliding-window layer; ``llama_kv1``: 1 KV head) sharded with ``tp_plan="auto"`` and
unsharded, runs every case and writes ``OUT/rank<R>.json``: case name -> what the case recorded
(token lists, byte counts, error messages), or ``{"error": traceback}``. The JSON is rewritten
after every case, so a case that hangs still leaves the earlier ones. The pytest side compares.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvmem  # noqa: E402
from kvmem.integrations.hf import is_patched, tp  # noqa: E402

NEW = 6
BANK = dict(mode="exact", sink_tokens=16, window=32, block_size=16, top_k=2, chunk_size=48)


def load(path, sharded: bool, **kw):
    from transformers import AutoModelForCausalLM

    if sharded:
        kw["tp_plan"] = "auto"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def gen(model, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("max_new_tokens", NEW)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kw)


def gen_cache(model, ids, mask=None, **kw):
    """``(tokens, the PagedKVCache the call returned)``."""
    out = gen(model, ids, mask, return_dict_in_generate=True, **kw)
    return out.sequences.tolist(), out.past_key_values


def patched(model, fn, **patch_kw):
    kvmem.patch(model, **patch_kw)
    try:
        return fn()
    finally:
        kvmem.unpatch(model)


def prompts(seed: int, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --------------------------------------------------------------------------------------------- cases
def greedy(tp_m, full_m, length):
    ids = torch.tensor(prompts(1, [length]))
    import transformers

    weight = tp_m.model.layers[0].self_attn.k_proj.weight
    return {"tp_kvmem": patched(tp_m, lambda: gen(tp_m, ids).tolist()),
            "tp_hf": gen(tp_m, ids).tolist(),
            "full_hf": gen(full_m, ids).tolist(),
            "full_kvmem": patched(full_m, lambda: gen(full_m, ids).tolist()),
            "transformers": transformers.__version__, "k_proj_weight": type(weight).__name__,
            "rank_kv_heads": tp.rank_kv_heads(tp_m)}


def ragged(tp_m, full_m, lengths):
    ids, mask = left_pad(prompts(2, lengths))
    return {"tp_kvmem": patched(tp_m, lambda: gen(tp_m, ids, mask).tolist()),
            "tp_hf": gen(tp_m, ids, mask).tolist(),
            "full_hf": gen(full_m, ids, mask).tolist()}


def beam(tp_m, full_m):
    ids = torch.tensor(prompts(3, [11]))
    kw = dict(num_beams=3, num_return_sequences=2)
    return {"tp_kvmem": patched(tp_m, lambda: gen(tp_m, ids, **kw).tolist()),
            "tp_hf": gen(tp_m, ids, **kw).tolist(),
            "full_hf": gen(full_m, ids, **kw).tolist()}


def prefix_cache(tp_m, full_m):
    system = prompts(4, [37])[0]
    rows = [system + tail for tail in prompts(5, [5, 9])]
    fed, orig = [], tp_m.model.forward

    def spy(*a, **k):
        fed.append(k["input_ids"].shape[1])
        return orig(*a, **k)

    def run():
        tp_m.model.forward = spy
        try:
            outs = []
            for r in rows:
                fed.clear()
                outs.append(gen(tp_m, torch.tensor([r])).tolist())
                outs.append(fed[0])
            return outs
        finally:
            tp_m.model.forward = orig

    got = patched(tp_m, run, block_size=4, prefix_cache=True, num_blocks=200)
    return {"tp_kvmem": [got[0], got[2]], "first_fed": [got[1], got[3]], "prompt_lens": [len(r) for r in rows],
            "full_hf": [gen(full_m, torch.tensor([r])).tolist() for r in rows]}


def static_decode(tp_m, full_m):
    """Decode steps over fixed-shape metadata (``cuda_graph=True``: captured on CUDA, eager here)."""
    ids = torch.tensor(prompts(12, [9]))
    def run():
        tokens = [gen(tp_m, ids).tolist() for _ in range(2)]
        return tokens, dict(tp_m._kvmem_runner.stats)

    tokens, stats = patched(tp_m, run, cuda_graph=True)
    return {"tp_kvmem": tokens, "full_hf": [gen(full_m, ids).tolist()] * 2, "stats": stats}


def cache_full(tp_m, full_m):
    from kvmem import PagedKVCache
    from kvmem.integrations.hf.compat import cache_kwarg

    ids = torch.tensor(prompts(6, [16]))
    out = {}
    try:  # a generate() call whose prompt does not fit: every rank raises at the first layer's step
        patched(tp_m, lambda: gen(tp_m, torch.tensor(prompts(7, [40]))), block_size=4, num_blocks=4)
        out["generate_error"] = None
    except kvmem.CacheFullError as e:
        out["generate_error"] = str(e)
    kvmem.patch(tp_m)
    try:  # a hand-made cache filled to its last block: the next step raises with nothing changed
        cache = PagedKVCache(tp_m.config, block_size=4, num_blocks=5, num_kv_heads=tp.rank_kv_heads(tp_m))
        kw = {cache_kwarg(tp_m): cache}
        with torch.no_grad():
            tp_m(input_ids=ids, **kw)
            for _ in range(4):
                tp_m(input_ids=ids[:, :1], **kw)
            before = cache.manager.debug_state()
            try:
                tp_m(input_ids=ids[:, :1], **kw)
                out["step_error"] = None
            except kvmem.CacheFullError as e:
                out["step_error"] = str(e)
            out["unchanged"] = cache.manager.debug_state() == before and cache.get_seq_length() == 20
            cache.crop(-1)
            tp_m(input_ids=ids[:, :1], **kw)  # the cache (and every rank) keeps working
            out["after_crop_len"] = cache.get_seq_length()
    finally:
        kvmem.unpatch(tp_m)
    short = torch.tensor(prompts(8, [8]))
    out["after"] = patched(tp_m, lambda: gen(tp_m, short).tolist(), block_size=4, num_blocks=4)
    out["full_hf"] = gen(full_m, short).tolist()
    return out


def kv_bytes(tp_m, full_m):
    ids = torch.tensor(prompts(9, [29]))
    _, tc = patched(tp_m, lambda: gen_cache(tp_m, ids))
    _, fc = patched(full_m, lambda: gen_cache(full_m, ids))
    _, budget = patched(tp_m, lambda: gen_cache(tp_m, ids), memory="64KiB")  # memory= is this rank's budget
    return {"tp_held": tc.kv_bytes_held(), "full_held": fc.kv_bytes_held(),
            "tp_reserved": tc.kv_bytes_reserved(), "full_reserved": fc.kv_bytes_reserved(),
            "tp_blocks": {g: u.num_blocks for g, u in tc.usage().items()},
            "full_blocks": {g: u.num_blocks for g, u in fc.usage().items()},
            "tp_heads": tc.num_kv_heads, "pool_heads": int(tc.pools[0][0].shape[2]),
            "budget_reserved": budget.kv_bytes_reserved(),
            "tp_size": tp.tp_size(tp_m), "config_heads": tp_m.config.num_key_value_heads}


def memory_bank(tp_m, full_m):
    ids = torch.tensor(prompts(10, [150]))

    def run(m):
        tokens = gen(m, ids).tolist()
        report = m._kvmem_memory_report
        return tokens, {str(k): list(v.shape) for k, v in report.selected.items()}

    tp_tokens, tp_sel = patched(tp_m, lambda: run(tp_m), memory_bank=kvmem.MemoryConfig(**BANK))
    full_tokens, full_sel = patched(full_m, lambda: run(full_m), memory_bank=kvmem.MemoryConfig(**BANK))
    return {"tp_kvmem": tp_tokens, "full_kvmem": full_tokens, "tp_selected": tp_sel, "full_selected": full_sel}


def fp8_scales(tp_m, full_m):
    """Per-head float8 scales calibrated on the unsharded model: each rank takes its heads' scales."""
    ids = torch.tensor(prompts(11, [24]))
    scales = kvmem.calibrate_kv_scales(full_m, ids)
    kw = dict(kv_cache_dtype="fp8", kv_scales=scales)
    tp_tokens, cache = patched(tp_m, lambda: gen_cache(tp_m, ids), **kw)
    full_tokens, _ = patched(full_m, lambda: gen_cache(full_m, ids), **kw)
    mine = kvmem.calibrate_kv_scales(tp_m, ids)  # on the sharded model: the rank's heads
    rank_tokens, _ = patched(tp_m, lambda: gen_cache(tp_m, ids), kv_cache_dtype="fp8", kv_scales=mine)
    r = dist.get_rank()
    return {"tp_kvmem": tp_tokens, "full_kvmem": full_tokens, "full_hf": gen(full_m, ids).tolist(),
            "tp_calibrated": rank_tokens, "calibrated_heads": [list(t.shape) for t in mine.k],
            "calibrated_close": all(torch.allclose(a, b[2 * r:2 * r + 2], rtol=1e-5) for a, b in zip(mine.k, scales.k)),
            "scale_heads": [list(t.shape) for t in cache.kv_scales.k],
            "scales_match": all(torch.equal(a, b[2 * dist.get_rank():2 * dist.get_rank() + 2])
                                for a, b in zip(cache.kv_scales.k, scales.k))}


def sink_logits_dtensor():
    """Sink logits as HF may hand them: a sharded or a replicated DTensor, or the local shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(8.0)
    mine = full.chunk(dist.get_world_size())[dist.get_rank()]
    out = {"shard": torch.equal(tp.rank_sink_logits(distribute_tensor(full, mesh, [Shard(0)]), 4), mine),
           "replicate": torch.equal(tp.rank_sink_logits(distribute_tensor(full, mesh, [Replicate()]), 4), mine),
           "local": torch.equal(tp.rank_sink_logits(mine, 4), mine)}
    try:
        tp.rank_sink_logits(full, 4)
        out["wrong_size_error"] = None
    except ValueError as e:
        out["wrong_size_error"] = str(e)
    return out


def patch_before(path, full_m):
    """``attn_implementation="kvmem"`` chosen before the model is sharded (at load)."""
    kvmem.integrations.hf.register()
    m = load(path, True, attn_implementation="kvmem")
    ids = torch.tensor(prompts(1, [13]))
    tokens, cache = gen_cache(m, ids)
    return {"tp_kvmem": tokens, "full_hf": gen(full_m, ids).tolist(), "cache": type(cache).__name__,
            "heads": cache.num_kv_heads}


def kv_heads_lt_ranks(path):
    """1 KV head over 2 ranks: HF's plan splits the head's features; kvmem.patch refuses at once."""
    m = load(path, True)
    try:
        gen(m, torch.tensor(prompts(1, [5])))
        hf_error = None
    except RuntimeError as e:  # transformers 5.24: its attention cannot reshape half a head
        hf_error = str(e)
    try:
        kvmem.patch(m)
        patch_error = None
    except ValueError as e:
        patch_error = str(e)
    return {"patch_error": patch_error, "patched": is_patched(m), "hf_error": hf_error}


def main(models: str, out_dir: str) -> None:
    llama, qwen2 = os.path.join(models, "llama"), os.path.join(models, "qwen2")
    tp_llama, full_llama = load(llama, True), load(llama, False)
    rank = dist.get_rank()
    tp_qwen, full_qwen = load(qwen2, True), load(qwen2, False)
    cases = {
        "greedy_llama": lambda: greedy(tp_llama, full_llama, 20),
        "greedy_qwen2_sliding": lambda: greedy(tp_qwen, full_qwen, 29),
        "ragged_llama": lambda: ragged(tp_llama, full_llama, [13, 5, 9]),
        "ragged_qwen2_sliding": lambda: ragged(tp_qwen, full_qwen, [21, 7]),
        "beam_llama": lambda: beam(tp_llama, full_llama),
        "prefix_cache_qwen2_sliding": lambda: prefix_cache(tp_qwen, full_qwen),
        "static_decode_llama": lambda: static_decode(tp_llama, full_llama),
        "cache_full_llama": lambda: cache_full(tp_llama, full_llama),
        "kv_bytes_qwen2_sliding": lambda: kv_bytes(tp_qwen, full_qwen),
        "memory_bank_llama": lambda: memory_bank(tp_llama, full_llama),
        "fp8_scales_llama": lambda: fp8_scales(tp_llama, full_llama),
        "sink_logits_dtensor": sink_logits_dtensor,
        "patch_before_sharding_llama": lambda: patch_before(llama, full_llama),
        "kv_heads_lt_ranks": lambda: kv_heads_lt_ranks(os.path.join(models, "llama_kv1")),
    }
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception:  # noqa: BLE001 - recorded for the pytest side
            results[name] = {"error": traceback.format_exc()}
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
