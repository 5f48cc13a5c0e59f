"""The verified-record gate (CPU): the dispatcher picks the CUDA kernels by default only for
configurations the committed record lists for this GPU arch; the record format round-trips from
what the gpu tests of tests/ops write, through tools/merge_verified.py, to ``is_verified``."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from kvmem import _ext, backends, dispatch, verified

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _call(dtype=torch.bfloat16, head_dim=128, block_size=16, num_heads=32, num_kv_heads=8, op="paged_attention"):
    if op == "paged_attention":
        return backends.Call("paged_attention", "cuda", dtype, head_dim, block_size, num_heads, num_kv_heads, dtype)
    return backends.Call(op, "cuda", dtype, head_dim, 0, num_heads, num_kv_heads, dtype)


def _entry(op="paged_attention", dtype="bfloat16", head_dim=128, block_size=16, max_group=16):
    e = {"op": op, "dtype": dtype, "head_dim": head_dim, "block_size": block_size}
    if op == "paged_attention":
        e["max_group"] = max_group
    return e


@pytest.fixture
def record_dir(tmp_path, monkeypatch):
    """kvmem.verified reads its records from tmp_path; caches cleared before and after."""
    monkeypatch.setattr(verified, "HERE", str(tmp_path))
    verified.clear_cache()
    backends._select.cache_clear()
    yield tmp_path
    verified.clear_cache()
    backends._select.cache_clear()


def _write_gpu_run(path, arch="sm_90", entries=None):
    rec = verified.make_record(arch, entries if entries is not None else [_entry()], gpu="NVIDIA H100",
                               driver="570.86.15", torch_version="2.11.0", triton_version="3.6.0",
                               cuda_version="13.0")
    with open(path, "w") as f:
        json.dump(rec, f)
    return rec


def test_round_trip_record_merge_is_verified(record_dir):
    committed = record_dir / "cuda.json"
    committed.write_text(json.dumps({"_doc": "kept", "records": {
        "sm_80": {"gpu": "A100", "date": "2026-01-01", "passed": [_entry(head_dim=64)]}}}))
    run = record_dir / "verified.json"
    _write_gpu_run(run, entries=[_entry(), _entry(dtype="float16", head_dim=80, block_size=1, max_group=8),
                                 _entry(op="merge_states", block_size=0), _entry()])  # a duplicate too
    assert verified.merge_files(str(committed), str(run)) == ["sm_90"]
    data = json.loads(committed.read_text())
    assert data["_doc"] == "kept" and set(data["records"]) == {"sm_80", "sm_90"}
    rec = data["records"]["sm_90"]
    assert rec["date"] and rec["driver"] == "570.86.15" and len(rec["passed"]) == 3  # deduplicated
    # listed: verified
    assert verified.is_verified("cuda", "sm_90", _call())
    assert verified.is_verified("cuda", "sm_90", _call(torch.float16, 80, 1, num_heads=16, num_kv_heads=2))
    assert verified.is_verified("cuda", "sm_90", _call(op="merge_states"))
    assert verified.is_verified("cuda", "sm_80", _call(head_dim=64, num_heads=8, num_kv_heads=8))
    # not listed: another arch, dtype, head dim, page size, op, or a group above the tested one
    assert not verified.is_verified("cuda", "sm_86", _call())
    assert not verified.is_verified("cuda", "sm_80", _call())
    assert not verified.is_verified("cuda", "sm_90", _call(torch.float16))
    assert not verified.is_verified("cuda", "sm_90", _call(head_dim=64))
    assert not verified.is_verified("cuda", "sm_90", _call(block_size=32))
    assert not verified.is_verified("cuda", "sm_90", _call(op="cache_write"))
    assert verified.is_verified("cuda", "sm_90", _call(num_heads=128, num_kv_heads=8))  # group 16
    assert not verified.is_verified("cuda", "sm_90", _call(num_heads=136, num_kv_heads=8))  # group 17
    assert not verified.is_verified("cuda", "sm_90", _call(torch.float16, 80, 1, num_heads=24, num_kv_heads=2))
    # a second run of the same arch replaces its record
    _write_gpu_run(run, entries=[_entry(head_dim=256)])
    verified.merge_files(str(committed), str(run))
    assert not verified.is_verified("cuda", "sm_90", _call())
    assert verified.is_verified("cuda", "sm_90", _call(head_dim=256))
    assert verified.is_verified("cuda", "sm_80", _call(head_dim=64, num_heads=8, num_kv_heads=8))


def test_entries_without_max_group_cover_group_8(record_dir):
    e = _entry()
    del e["max_group"]
    (record_dir / "cuda.json").write_text(json.dumps({"records": {"sm_90": {"date": "x", "passed": [e]}}}))
    assert verified.is_verified("cuda", "sm_90", _call(num_heads=64, num_kv_heads=8))
    assert not verified.is_verified("cuda", "sm_90", _call(num_heads=72, num_kv_heads=8))


def test_cache_dtypes_and_scales_need_their_own_entries(record_dir):
    """A float8 cache, a 16-bit cache under the other 16-bit q, or scales: verified only by an entry
    naming that cache_dtype / kv_scale (new cache kernels start unverified)."""
    fp8 = torch.float8_e4m3fn
    fp8_entry = {**_entry(dtype="float16"), "cache_dtype": "float8_e4m3fn", "kv_scale": True}
    (record_dir / "cuda.json").write_text(json.dumps({"records": {"sm_90": {"date": "x", "passed": [
        _entry(), fp8_entry]}}}))
    scaled = frozenset({"kv_scale"})
    plain, f16 = _call(), _call(torch.float16)
    assert verified.is_verified("cuda", "sm_90", plain)
    assert verified.is_verified("cuda", "sm_90", dataclasses.replace(plain, features=frozenset({"rope"})))
    assert not verified.is_verified("cuda", "sm_90", dataclasses.replace(plain, cache_dtype=fp8, features=scaled))
    assert not verified.is_verified("cuda", "sm_90", dataclasses.replace(plain, features=scaled))
    assert not verified.is_verified("cuda", "sm_90", dataclasses.replace(plain, cache_dtype=torch.float16))
    assert verified.is_verified("cuda", "sm_90", dataclasses.replace(f16, cache_dtype=fp8, features=scaled | {"rope"}))
    assert not verified.is_verified("cuda", "sm_90",
                                    dataclasses.replace(f16, cache_dtype=torch.float8_e5m2, features=scaled))
    assert not verified.is_verified("cuda", "sm_90", f16)


def test_merge_tool_cli(tmp_path):
    into = tmp_path / "cuda.json"
    into.write_text(json.dumps({"records": {}}))
    run = tmp_path / "verified.json"
    _write_gpu_run(run)
    tool = os.path.join(ROOT, "tools", "merge_verified.py")
    res = subprocess.run([sys.executable, tool, str(run), "--into", str(into)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "sm_90: 1 verified entries" in res.stdout
    assert json.loads(into.read_text())["records"]["sm_90"]["passed"] == [_entry()]
    bad = tmp_path / "bad.json"  # the old format: {"arch": ..., "passed": {backend: [...]}}
    bad.write_text(json.dumps({"arch": "sm_90", "passed": {"cuda": []}}))
    res = subprocess.run([sys.executable, tool, str(bad), "--into", str(into)], capture_output=True, text=True)
    assert res.returncode == 1 and "records" in res.stderr


def test_committed_record_is_well_formed():
    with open(verified.path_of("cuda")) as f:
        data = json.load(f)
    for arch, rec in data["records"].items():
        assert arch.startswith("sm_") and "date" in rec and isinstance(rec["passed"], list)
        for e in rec["passed"]:
            assert {"op", "dtype", "head_dim", "block_size"} <= set(e)


def test_driver_version_unknown_without_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert verified.gpu_driver_version() == "unknown"


def _cuda_build_facts(op, device_type):
    """What a CUDA build reports (csrc/torch_bindings.cpp) for ``op`` on ``device_type``."""
    if op == "paged_attention" and device_type == "cuda":
        return {"dtypes": ["float16", "bfloat16"], "head_dims": [64, 80, 96, 112, 128, 256], "max_head_dim": 256,
                "cache_dtypes": ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]}
    return {"dtypes": ["float32", "bfloat16", "float16"], "head_dims": [], "max_head_dim": 256}


@pytest.fixture
def fake_cuda(monkeypatch, record_dir):
    """A CUDA extension 'built' for every op, on an sm_90 GPU; no env override."""
    monkeypatch.setattr(_ext, "has_kernel", lambda name, device_type: True)
    monkeypatch.setattr(_ext, "kernel_facts", _cuda_build_facts)
    monkeypatch.setattr(dispatch.backends, "cuda_arch", lambda: "sm_90")
    monkeypatch.delenv("KVMEM_BACKEND", raising=False)
    (record_dir / "cuda.json").write_text(json.dumps(verified.make_record(
        "sm_90", [_entry(), _entry(op="merge_states", block_size=0)], gpu="H100", driver="x",
        torch_version="2.11", triton_version="3.6")))
    return record_dir


def test_gate_listed_chooses_cuda(fake_cuda):
    assert backends.select(_call()).name == "cuda"
    assert backends.select(_call(op="merge_states")).name == "cuda"


def test_gate_unlisted_chooses_triton(fake_cuda):
    pytest.importorskip("triton")
    for call in (_call(head_dim=64), _call(torch.float16), _call(block_size=32), _call(op="cache_write"),
                 _call(num_heads=8 * 24, num_kv_heads=8)):
        assert backends.select(call).name == "triton", call
    why = backends.CudaBackend().rejects(_call(head_dim=64))
    assert why[0] == "inapplicable" and "verified record for sm_90" in why[1]


def test_gate_new_cache_kernels_start_unverified(fake_cuda, monkeypatch):
    """A float8 cache under a listed (plain) entry: the CUDA record's facts take it, the verified
    record does not list it, so the default is another backend; forced, CUDA runs it."""
    fp8 = dataclasses.replace(_call(), cache_dtype=torch.float8_e4m3fn, features=frozenset({"kv_scale"}))
    assert backends.CudaBackend().capability("paged_attention").rejects(fp8) is None
    assert backends.select(fp8).name != "cuda"
    why = backends.CudaBackend().rejects(fp8)
    assert why[0] == "inapplicable" and "verified record for sm_90" in why[1]
    fp32_cache = dataclasses.replace(_call(), cache_dtype=torch.float32)
    assert "cache dtype" in backends.CudaBackend().capability("paged_attention").rejects(fp32_cache)[1]
    monkeypatch.setenv("KVMEM_BACKEND", "cuda")
    assert backends.select(fp8).name == "cuda"


def test_gate_other_arch_chooses_triton(fake_cuda, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(dispatch.backends, "cuda_arch", lambda: "sm_86")
    assert backends.select(_call()).name == "triton"


def test_gate_forced_cuda(fake_cuda, monkeypatch):
    monkeypatch.setenv("KVMEM_BACKEND", "cuda")
    assert backends.select(_call(head_dim=64)).name == "cuda"  # not listed, forced
    assert backends.select(_call()).name == "cuda"
    with pytest.raises(RuntimeError, match="KVMEM_BACKEND=cuda"):
        backends.select(_call(torch.float32))  # forced, but no fp32 paged_attention kernel
