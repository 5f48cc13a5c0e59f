"""kvmem without its compiled extension (a user who never built it, or a pure-Python install).

CI always builds ``kvmem._C``, so a fresh subprocess hides it with an import blocker on
``sys.meta_path`` (what Python raises when the .so is absent or was built against another torch)
and checks the promise of DESIGN.md §5: ``import kvmem`` works, ``explain()`` says how to build
the extension, every op falls back to the reference with a correct answer, and exactly one log
line says so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from tolerances import DENSE, LSE, MERGE_SELF_FP32

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r'''
import importlib.abc, json, logging, math, sys


class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kvmem._C":
            raise ModuleNotFoundError("No module named 'kvmem._C' (hidden by tests/test_no_ext.py)", name=name)
        return None


sys.meta_path.insert(0, HideExtension())
records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())


logging.getLogger("kvmem").addHandler(Keep())
logging.getLogger("kvmem").setLevel(logging.INFO)

import torch
import torch.nn.functional as F

import kvmem
from kvmem import _ext, backends

report = {"logs_after_import": list(records), "ext_loaded": "kvmem._C" in sys.modules}
torch.manual_seed(0)

# A paged problem: 2 sequences (prefill with a cached prefix, decode), GQA 4/2, shuffled pages.
Hq, Hkv, D, bs = 4, 2, 32, 4
q_lens, kv_lens = [3, 1], [10, 7]
num_blocks = 8
k_cache = torch.full((num_blocks, bs, Hkv, D), math.nan)
v_cache = torch.full((num_blocks, bs, Hkv, D), math.nan)
perm = torch.randperm(num_blocks).tolist()
table = torch.full((2, 4), -1, dtype=torch.int32)
k_dense, v_dense = [], []
for b, n in enumerate(kv_lens):
    k, v = torch.randn(n, Hkv, D), torch.randn(n, Hkv, D)
    for i in range(-(-n // bs)):
        table[b, i] = perm.pop()
    slots = torch.tensor([int(table[b, t // bs]) * bs + t % bs for t in range(n)])
    kvmem.cache_write(k, v, k_cache, v_cache, slots)  # falls back to the reference
    k_dense.append(k)
    v_dense.append(v)
report["cache_write_ok"] = all(
    torch.equal(k_cache[table[b, t // bs], t % bs], k_dense[b][t]) and torch.equal(v_cache[table[b, t // bs], t % bs], v_dense[b][t])
    for b in range(2) for t in range(kv_lens[b]))

q = torch.randn(sum(q_lens), Hq, D)
seq_lens = torch.tensor(kv_lens, dtype=torch.int32)
cu = torch.tensor([0, 3, 4], dtype=torch.int32)
args = (q, k_cache, v_cache, table, seq_lens, cu, max(q_lens), max(kv_lens))
call = backends.Call.paged_attention(q, k_cache, v_cache, max(q_lens))
report["explain"] = backends.explain(call)
out, lse = kvmem.paged_attention(*args, return_lse=True)
out2 = kvmem.paged_attention(*args)  # a second call: no second log line

# Independently: dense SDPA per sequence on contiguous K/V, bottom-right causal.
expected = []
start = 0
for b, (ql, n) in enumerate(zip(q_lens, kv_lens)):
    qb = q[start:start + ql].transpose(0, 1)  # [Hq, ql, D]
    kb = k_dense[b].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
    vb = v_dense[b].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
    pos = torch.arange(n - ql, n)
    mask = torch.arange(n)[None, :] <= pos[:, None]
    expected.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask).transpose(0, 1))
    start += ql
expected = torch.cat(expected)
report["second_call_same"] = bool(torch.equal(out, out2))
o, l = kvmem.merge_states(out, lse, out, lse)
torch.save(dict(out=out, expected=expected, lse=lse, merged_out=o, merged_lse=l), sys.argv[1])

try:
    _ext.get_op("paged_attention")
    report["get_op"] = "no error"
except RuntimeError as e:
    report["get_op"] = str(e)
report["logs"] = records
report["ext_loaded_at_end"] = "kvmem._C" in sys.modules
print(json.dumps(report))
'''


def test_without_the_extension(tmp_path):
    env = dict(os.environ)
    env.pop("KVMEM_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    saved = tmp_path / "tensors.pt"
    res = subprocess.run([sys.executable, "-c", CHILD, str(saved)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])

    assert r["logs_after_import"] == [] and not r["ext_loaded"] and not r["ext_loaded_at_end"], r
    why = r["explain"]
    assert list(why) == ["cuda", "triton", "cpu", "reference"], why
    assert why["reference"] == "selected", why
    assert "kvmem._C is not importable" in why["cpu"] and "pip install --no-build-isolation" in why["cpu"], why
    assert "pip install --no-build-isolation" in r["get_op"], r["get_op"]

    assert r["cache_write_ok"], r
    t = torch.load(saved)
    torch.testing.assert_close(t["out"], t["expected"], **DENSE)  # the reference vs dense SDPA
    assert torch.isfinite(t["lse"]).all() and r["second_call_same"], r
    torch.testing.assert_close(t["merged_out"], t["out"], **MERGE_SELF_FP32)
    torch.testing.assert_close(t["merged_lse"], t["lse"] + math.log(2), **LSE)

    assert len(r["logs"]) == 1, r["logs"]  # exactly one line, however many calls
    line = r["logs"][0]
    assert "compiled kernels unavailable" in line and "fall back" in line and "reference" in line, line
    assert "pip install --no-build-isolation" in line, line
