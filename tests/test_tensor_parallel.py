"""kvmem under tensor parallelism: HF ``tp_plan="auto"`` over ``torchrun --nproc-per-node 2`` (gloo, CPU).

One torchrun launch (``tests/tp_worker.py``) runs every case on random-weight models saved here (a
Llama of 8 query / 4 KV heads, a Qwen2 with a full and a sliding-window layer, a Llama of 1 KV
head) and writes each rank's results as JSON; each test below asserts one case from both ranks.
The launch has a timeout and kills its process group: a hang fails, it never blocks the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "tp_worker.py")
RANKS = 2
TIMEOUT_S = 150

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=None, bos_token_id=None)

CASES = ["greedy_llama", "greedy_qwen2_sliding", "ragged_llama", "ragged_qwen2_sliding", "beam_llama",
         "static_decode_llama", "prefix_cache_qwen2_sliding", "cache_full_llama", "kv_bytes_qwen2_sliding",
         "memory_bank_llama", "fp8_scales_llama", "sink_logits_dtensor", "patch_before_sharding_llama",
         "kv_heads_lt_ranks"]


def _save_models(root: str) -> None:
    models = [("llama", "LlamaConfig", "LlamaForCausalLM", {}),
              ("qwen2", "Qwen2Config", "Qwen2ForCausalLM",
               dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
              ("llama_kv1", "LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1))]
    for name, cfg_cls, model_cls, extra in models:
        cfg = getattr(transformers, cfg_cls)(**dict(COMMON, **extra))
        torch.manual_seed(0)
        getattr(transformers, model_cls)(cfg).save_pretrained(os.path.join(root, name))
    layer_types = transformers.AutoConfig.from_pretrained(os.path.join(root, "qwen2")).layer_types
    assert layer_types == ["full_attention", "sliding_attention"], layer_types


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """``{rank: {case: result}}`` from one ``torchrun --nproc-per-node 2`` run of tests/tp_worker.py."""
    root = tmp_path_factory.mktemp("tp")
    models, out = root / "models", root / "out"
    out.mkdir()
    _save_models(str(models))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
           WORKER, str(models), str(out)]  # --standalone: a free rendezvous port on localhost
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S}s (killed); output tail:\n{log[-4000:]}")
    results = {}
    for r in range(RANKS):
        path = out / f"rank{r}.json"
        if path.exists():
            results[r] = json.loads(path.read_text())
    if proc.returncode != 0 or len(results) != RANKS:
        pytest.fail(f"torchrun exited {proc.returncode} after {time.monotonic() - start:.0f}s; "
                    f"output tail:\n{log[-4000:]}")
    return results


@pytest.fixture(params=CASES)
def case(request, tp_results):
    """``(name, rank 0's result)`` of one case, after checking it ran on every rank with no error and
    recorded the same on every rank (the ranks take the same decisions)."""
    name = request.param
    got = [tp_results[r].get(name) for r in range(RANKS)]
    for r, res in enumerate(got):
        assert res is not None, f"rank {r} did not record case {name}"
        assert not res.get("error"), f"rank {r}, case {name}:\n{res['error']}"
    for r in range(1, RANKS):
        assert got[r] == got[0], f"case {name}: rank {r} recorded {got[r]}, rank 0 {got[0]}"
    return name, got[0]


@needs_gloo
def test_tensor_parallel_case(case):
    name, res = case
    kind = name.split("_")[0]
    if kind in ("greedy", "ragged", "beam", "patch", "static"):  # patched sharded == unpatched sharded == unsharded
        assert res["tp_kvmem"] == res["full_hf"]
        if "tp_hf" in res:
            assert res["tp_kvmem"] == res["tp_hf"]
        if "full_kvmem" in res:
            assert res["full_kvmem"] == res["full_hf"]
        if "rank_kv_heads" in res:  # and the versions it ran under, in the JSON: transformers, k_proj_weight
            assert res["rank_kv_heads"] == 4 // RANKS
        if kind == "static":  # every decode step (5 per call) ran on the fixed-shape buffers
            assert sum(res["stats"].values()) == 2 * 5, res["stats"]
        if kind == "patch":  # attn_implementation="kvmem" at load: the cache holds the rank's 2 heads
            assert res["cache"] == "PagedKVCache" and res["heads"] == 2
    elif kind == "prefix":
        assert res["tp_kvmem"] == res["full_hf"]
        assert res["first_fed"][0] == res["prompt_lens"][0]  # nothing cached yet
        assert res["first_fed"][1] == res["prompt_lens"][1] - 36  # 9 blocks of 4 system-prompt tokens reused
    elif kind == "cache":
        assert res["generate_error"] and "is full" in res["generate_error"]
        assert res["step_error"] and "num_blocks=6" in res["step_error"] and res["unchanged"]
        assert res["after_crop_len"] == 20 and res["after"] == res["full_hf"]
    elif kind == "kv":
        if name == "kv_heads_lt_ranks":
            assert not res["patched"]
            assert "num_key_value_heads=1" in res["patch_error"] and "tp_size=2" in res["patch_error"]
            return
        assert res["tp_size"] == RANKS and res["config_heads"] == 4
        assert res["tp_heads"] == res["pool_heads"] == 4 // RANKS
        assert res["tp_blocks"] == res["full_blocks"]  # the same allocation decisions, half the bytes
        assert res["tp_held"] * RANKS == res["full_held"] > 0
        assert res["tp_reserved"] * RANKS == res["full_reserved"]
        assert res["budget_reserved"] <= 64 * 1024  # memory= is each rank's budget
    elif kind == "fp8":  # the rank's slice of the unsharded model's per-head scales: the same tokens
        assert res["scales_match"] and all(s == [4 // RANKS] for s in res["scale_heads"])
        assert res["tp_kvmem"] == res["full_kvmem"] == res["tp_calibrated"]
        assert res["calibrated_close"] and all(s == [4 // RANKS] for s in res["calibrated_heads"])
    elif kind == "sink":
        assert res["shard"] and res["replicate"] and res["local"]
        assert "8 heads for 4 query heads" in res["wrong_size_error"]
    elif kind == "memory":
        assert res["tp_kvmem"] == res["full_kvmem"]
        assert res["tp_selected"] and all(s == [1, 4 // RANKS, 2] for s in res["tp_selected"].values())
        assert all(s == [1, 4, 2] for s in res["full_selected"].values())
    else:
        raise AssertionError(f"no assertion for case {name}")


def _sharded_by_hand(kv_heads: int, rows: int, shard_q: bool = True):
    """A tiny Llama whose attention modules hold ``rows`` of k_proj's rows, as a TP rank would."""
    cfg = transformers.LlamaConfig(**dict(COMMON, num_key_value_heads=kv_heads))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model._tp_size = 2
    for layer in model.model.layers:
        attn = layer.self_attn
        if shard_q:
            attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight[: attn.q_proj.weight.shape[0] // 2])
        attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight[:rows])
    return model


def test_rank_kv_heads_reads_the_local_shard():
    """Without torchrun: the heads of a rank are read from k_proj's local rows (plain tensors, as
    older transformers keep them); a split KV head is refused by ``kvmem.patch`` before it changes
    the model, naming ``num_key_value_heads`` and ``tp_size``."""
    import kvmem
    from kvmem.integrations.hf import is_patched, tp

    assert tp.rank_kv_heads(transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))) == 4
    assert tp.rank_kv_heads(_sharded_by_hand(4, 16)) == 2  # head_dim 8: 2 of 4 KV heads
    split = _sharded_by_hand(1, 4)
    with pytest.raises(ValueError, match=r"num_key_value_heads=1 must be a multiple of tp_size=2"):
        kvmem.patch(split)
    assert not is_patched(split) and split.config._attn_implementation != "kvmem"
    with pytest.raises(ValueError, match=r"GQA group of 2 query heads per KV head .* must stay on one rank"):
        tp.rank_kv_heads(_sharded_by_hand(4, 16, shard_q=False))  # every query head, half the KV heads
