"""The benchmark harness ``python -m kvmem.bench`` (run in-process through ``main(argv)``)."""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import importlib.util
import json
import os

import pytest
import torch

from kvmem import backends
from kvmem.bench import harness, peers
from kvmem.bench.harness import main
from kvmem.bench.inputs import paged_batch
from kvmem.bench.peers import Impl

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
ROW_KEYS = {"case", "impl", "kvmem", "ms", "gbps", "tflops", "pct", "ratio", "max_diff", "status", "note"}
TINY = ["--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--page-size", "8", "--quick", "--device", "cpu"]


def _cpu_backend_runs() -> bool:
    b = paged_batch(1, 16, 1, 4, 2, 32)
    return backends.BY_NAME["cpu"].rejects(backends.Call.paged_attention(b.q, b.k_cache, b.v_cache, 1)) is None


def _load(out_dir, mode):
    files = glob.glob(os.path.join(str(out_dir), f"{mode}_cpu_float32_*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return json.load(f), files[0]


def _check_payload(data, mode, rate_key):
    assert data["mode"] == mode
    assert {"machine", "limits", "rows", "skipped", "config", "date"} <= set(data)
    assert {"cpu", "torch", "triton", "gpu", "driver", "kvmem_build"} <= set(data["machine"])
    limits = data["limits"]
    assert limits["copy_gbps"] > 0 and limits["read_gbps"] > 0 and limits["matmul_tflops"] > 0
    assert limits["matmul_dtype"] == "float32"
    assert data["rows"], "no implementation was timed"
    for r in data["rows"]:
        assert ROW_KEYS <= set(r), r
        assert r["ms"] > 0 and r[rate_key] > 0 and r["pct"] > 0 and r["ratio"] > 0
        assert r["status"] == "OK", r  # every implementation here matches the reference
    impls = {r["impl"] for r in data["rows"]}
    assert {"sdpa[default]", "sdpa[math]"} <= impls
    assert impls & {"flex[paged]", "flex[paged,eager]"}  # FlexAttention on kvmem's own pages
    assert "kvmem[reference]" not in impls  # excluded unless --include-reference
    skipped = {s["impl"]: s["reason"] for s in data["skipped"]}
    assert skipped["flashinfer"] == "not installed" or "flashinfer" in impls
    assert skipped["flash-attn"] == "not installed" or "flash-attn" in impls
    if _cpu_backend_runs():
        assert "kvmem[cpu]" in impls
    else:  # the C++ backend is not built: the harness still runs, and says why
        assert "kvmem[cpu]" in skipped
    for case in {r["case"] for r in data["rows"]}:
        peer = [r["ratio"] for r in data["rows"] if r["case"] == case and not r["kvmem"]]
        assert max(peer) == pytest.approx(1.0)  # the best peer is the unit


def test_decode_quick(tmp_path, capsys):
    assert main(["decode", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data, path = _load(tmp_path, "decode")
    _check_payload(data, "decode", "gbps")
    assert all(r["q_len"] == 1 for r in data["rows"])
    assert data["limits"]["decode_limit"] == "read_gbps"
    assert os.path.exists(path[:-5] + ".png") == HAS_MPL
    out = capsys.readouterr().out
    assert "GB/s" in out and "x best peer" in out and "GPU none" in out


def test_prefill_quick(tmp_path, capsys):
    assert main(["prefill", "--quick", "--device", "cpu", "--out", str(tmp_path), "--no-plot"]) == 0
    data, path = _load(tmp_path, "prefill")
    _check_payload(data, "prefill", "tflops")
    assert all(r["q_len"] == r["ctx"] for r in data["rows"])
    assert not os.path.exists(path[:-5] + ".png")
    assert "TFLOP/s" in capsys.readouterr().out


def test_chunked_prefill_masks_agree(tmp_path):
    """q_len < ctx: the dense peers need kvmem's bottom-right causal mask to agree."""
    argv = ["prefill", *TINY, "--context", "40", "--q-len", "12", "--batch", "2", "--out", str(tmp_path),
            "--no-plot", "--include-reference"]
    assert main(argv) == 0
    data, _ = _load(tmp_path, "prefill")
    assert [(r["batch"], r["ctx"], r["q_len"]) for r in data["rows"]][0] == (2, 40, 12)
    assert "kvmem[reference]" in {r["impl"] for r in data["rows"]}
    assert all(r["status"] == "OK" for r in data["rows"]), data["rows"]


def test_wrong_output_is_flagged(tmp_path, monkeypatch):
    def bad_peers(b, **kw):
        return [Impl("zeros", lambda: torch.zeros_like(b.q), lambda o: o)], []

    def bad_kvmem(b, **kw):
        return [Impl("kvmem[bad]", lambda: torch.ones_like(b.q), lambda o: o, kvmem=True)], []

    monkeypatch.setattr(peers, "peer_impls", bad_peers)
    assert main(["decode", *TINY, "--context", "32", "--out", str(tmp_path), "--no-plot"]) == 0
    data, path = _load(tmp_path, "decode")
    rows = {r["impl"]: r for r in data["rows"]}
    assert rows["zeros"]["status"] == "WRONG" and rows["zeros"]["max_diff"] > 1e-3
    assert all(r["ratio"] is None for r in rows.values())  # no correct peer to compare with
    os.remove(path)
    monkeypatch.setattr(peers, "kvmem_impls", bad_kvmem)
    assert main(["decode", *TINY, "--context", "32", "--out", str(tmp_path), "--no-plot"]) == 1


@pytest.mark.parametrize("command,what", [("memory", "memory bank")])
def test_not_available_yet(command, what, capsys, tmp_path):
    assert main([command, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not available yet" in out and what in out
    assert not os.listdir(tmp_path)


def test_generate_quick(tmp_path, capsys):
    """HF default vs kvmem on a tiny random-weight Llama: rows, ratios, identical fp32 tokens."""
    pytest.importorskip("transformers")
    assert main(["generate", "--quick", "--device", "cpu", "--batch", "1", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "random tiny" in out and "x HF" in out
    files = glob.glob(os.path.join(str(tmp_path), "generate_cpu_float32_*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        data = json.load(f)
    assert data["mode"] == "generate"
    m = data["machine"]  # the harness's machine record plus transformers
    assert {"gpu", "driver", "cuda_runtime", "torch", "triton", "kvmem", "kvmem_build", "cpu",
            "transformers", "load_avg_1m", "load_avg_1m_end"} <= set(m)
    assert m["cpu_count"] >= 1 and m["torch"] == torch.__version__
    assert m["transformers"] == importlib.import_module("transformers").__version__
    assert m["triton"] == (importlib.metadata.version("triton") if importlib.util.find_spec("triton") else None)
    assert m["gpu"] is None and m["driver"] is None  # CPU run
    rows = data["rows"]
    assert [(r["impl"], r["batch"]) for r in rows] == [("hf_default", 1), ("kvmem", 1), ("hf_default", 2), ("kvmem", 2)]
    for r in rows:
        assert r["identical"] and r["max_rel_logit_err"] <= 1e-4
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["kv_bytes_held"] > 0
    assert all(r["kv_bytes_reserved"] >= r["kv_bytes_held"] for r in rows if r["impl"] == "kvmem")
    assert all(r["decode_x_hf"] > 0 for r in rows if r["impl"] == "kvmem")
    if HAS_MPL:
        assert os.path.getsize(files[0][:-5] + ".png") > 1000


@pytest.mark.parametrize("argv,message", [
    (["generate", "--new-tokens", "1"], "--new-tokens"),
    (["generate", "--batch", "0"], "--batch"),
    ([], "required"),
    (["decode", "--batch", "0"], "positive integer"),
    (["decode", "--context", "x"], "positive integer"),
    (["prefill", "--dtype", "int8"], "invalid choice"),
    (["decode", "--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["decode", "--q-len", "4"], "--q-len is for prefill"),
    (["decode", "--backends", "cpu,nope"], "unknown"),
    (["decode", "--device", "tpu"], "--device"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda(capsys):
    with pytest.raises(SystemExit):
        main(["decode", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_cases():
    assert harness.cases("decode", "cpu") == harness.SWEEPS["decode", "cpu"]
    assert all(b * c >= 1 << 17 for b, c, _ in harness.SWEEPS["decode", "cuda"])
    assert harness.cases("prefill", "cpu", quick=True) == [(1, 128, 128), (2, 256, 256)]
    assert harness.cases("decode", "cpu", batch=[1, 2], context=[64]) == [(1, 64, 1), (2, 64, 1)]
    assert harness.cases("prefill", "cuda", context=[100], q_len=30) == [(1, 100, 30)]


def test_reference_output_chunks_agree():
    b = paged_batch(2, 48, 20, 4, 2, 16, block_size=8)
    whole = harness.reference_output(b)
    chunked = harness.reference_output(b, max_bytes=4 * 48 * 12 * 3)  # 3 query rows per chunk
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


@pytest.fixture
def no_cpu_backend(monkeypatch):
    """As if the C++ extension were not built (the dispatcher's choice cache is reset around it)."""
    monkeypatch.setattr(backends.CpuBackend, "rejects", lambda self, call: ("inapplicable", "kvmem._C not built"))
    backends._select.cache_clear()
    yield
    monkeypatch.undo()
    backends._select.cache_clear()


def test_runs_without_the_extension(tmp_path, no_cpu_backend):
    assert main(["decode", *TINY, "--context", "32", "--out", str(tmp_path), "--no-plot"]) == 0
    data, _ = _load(tmp_path, "decode")
    assert not [r for r in data["rows"] if r["kvmem"]]
    assert {r["impl"] for r in data["rows"]} >= {"sdpa[default]", "sdpa[math]"}
    assert "kvmem._C not built" in {s["impl"]: s["reason"] for s in data["skipped"]}["kvmem[cpu]"]


@pytest.mark.parametrize("batch,ctx,q_len,page", [(3, 37, 1, 8), (2, 40, 12, 8), (1, 24, 24, 4)])
def test_flex_paged_matches_reference(batch, ctx, q_len, page):
    """flex[paged] attends on kvmem's own pages (a view, no copy) through a BlockMask built from
    the shuffled block table; decode, chunked prefill (bottom-right causal) and full prefill."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    b = paged_batch(batch, ctx, q_len, 4, 2, 16, block_size=page)
    q, k, v, block_mask = peers.paged_block_mask(b)
    assert k.data_ptr() == b.k_cache.data_ptr() and v.data_ptr() == b.v_cache.data_ptr()
    assert k.shape == (1, 2, b.k_cache.shape[0] * page, 16) and q.shape == (batch, 4, q_len, 16)
    impls, skipped = peers.flex_paged_impls(b, compile=False)
    assert not skipped and [i.name for i in impls] == ["flex[paged,eager]"]
    ref = harness.reference_output(b).float()
    with impls[0].context():
        out = impls[0].tokens(impls[0].fn())
    assert (out.float() - ref).abs().max().item() <= harness.TOLERANCE[torch.float32]
    # only the pages each query block can see are listed (full ones skip the mask)
    assert block_mask.kv_num_blocks.shape[0] == batch
    seen = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    assert seen.max().item() == -(-ctx // page)


def test_flex_paged_compiled_matches_reference():
    """The compiled FlexAttention (the peer the full harness times) on the same pages."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    b = paged_batch(2, 40, 12, 4, 2, 16, block_size=8)
    impls, skipped = peers.flex_paged_impls(b, compile=True)
    if skipped:
        pytest.skip(f"compiled flex[paged] unavailable here: {skipped}")
    with impls[0].context():
        try:
            out = impls[0].tokens(impls[0].fn())
        except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor
            pytest.skip(f"torch.compile of flex_attention failed here: {peers.first_line(e)}")
    assert impls[0].name == "flex[paged]"
    assert (out.float() - harness.reference_output(b).float()).abs().max().item() <= 1e-3


def _suite(monkeypatch, quick_only: bool):
    """benchmarks/test_bench_paged.py imported fresh (its parameters depend on KVMEM_BENCH_QUICK)."""
    import importlib.util as iu

    monkeypatch.setenv("KVMEM_BENCH_QUICK", "1" if quick_only else "0")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "test_bench_paged.py")
    spec = iu.spec_from_file_location("_kvmem_bench_suite", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # 'quick' is registered in benchmarks/
def test_benchmark_suite_quick_params(monkeypatch):
    """The suite has a quick parameter set with the harness's --quick cases and every
    implementation the harness reports (forced kvmem backends, flex[paged], FlashInfer, flash-attn)."""
    pytest.importorskip("pytest_benchmark")
    suite = _suite(monkeypatch, quick_only=False)
    ids = [p.id for p in suite._params()]
    quick = [p for p in suite._params() if any(m.name == "quick" for m in p.marks)]
    assert quick and all("quick" in p.id for p in quick) and len(quick) < len(ids)
    cpu_quick = {p.values[2:6] for p in quick if p.values[0] == "cpu"}
    assert cpu_quick == {(m, *c) for m in harness.MODES for c in harness.cases(m, "cpu", quick=True)}
    names = {p.values[6] for p in quick if p.values[0] == "cpu"}
    assert {"kvmem", "kvmem[cpu]", "kvmem[cuda]", "kvmem[triton]", "flashinfer", "flash-attn",
            "flex[paged,eager]", "sdpa[default]"} <= names
    assert "flex[paged]" in {p.values[6] for p in suite._params() if p.values[0] == "cpu" and not p.values[1]}
    only = _suite(monkeypatch, quick_only=True)._params()
    assert only and all(p.values[1] for p in only) and len(only) == len(quick)


def test_benchmark_suite_quick_runs(tmp_path):
    """One quick CPU case of the suite, as CI runs it (--benchmark-disable)."""
    pytest.importorskip("pytest_benchmark")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-rs", "-p", "no:cacheprovider",
                        "-m", "quick and not gpu", "-k", "decode-B1- and (flex or kvmem)", "--benchmark-disable"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "kvmem[triton]: timed on CUDA only" in r.stdout


def test_bench_paged_attention_script(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_paged_attention.py: interleaved bandwidth/kernel rounds, medians and
    spreads in the JSON (run on one small case)."""
    import importlib.util as iu

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "bench_paged_attention.py")
    spec = iu.spec_from_file_location("_kvmem_bench_pa", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "cases", lambda quick: [("decode", 2, 256, 1)])
    probes = []
    real = mod.read_bandwidth_probe

    def probe(dev, nbytes):
        sample = real(dev, nbytes=1 << 22)

        def counted():
            probes.append(1)
            return sample()
        return counted
    monkeypatch.setattr(mod, "read_bandwidth_probe", probe)
    assert mod.main(["--quick", "--rounds", "2", "--reps", "1", "--out", str(tmp_path)]) == 0
    files = glob.glob(os.path.join(str(tmp_path), "paged_attention_cpu_float32_*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        data = json.load(f)
    assert len(probes) == 2 * len(data["rows"])  # one bandwidth sample before every kernel sample
    assert data["rounds"] == 2 and {"gpu", "driver", "torch", "triton"} <= set(data["machine"])
    assert data["read_bandwidth_gbps_min"] <= data["read_bandwidth_gbps"] <= data["read_bandwidth_gbps_max"]
    assert [r["impl"] for r in data["rows"]][1] == "torch SDPA"
    for r in data["rows"]:
        assert len(r["samples"]) == 2 and r["max_diff_vs_sdpa"] <= 1e-4
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["pct_read_bw_min"] <= r["pct_read_bw"] <= r["pct_read_bw_max"]
    assert data["target"] is None  # not the B=8 ctx=4096 case
    assert "% of read bw" in capsys.readouterr().out


def test_generate_cuda_graph_option(tmp_path):
    """--cuda-graph passes cuda_graph=True to kvmem.patch (without CUDA the static decode step
    runs eagerly): same tokens as HF, rows labelled kvmem[cuda-graph]."""
    pytest.importorskip("transformers")
    import inspect

    from kvmem import integrations

    if "cuda_graph" not in inspect.signature(integrations.patch).parameters:
        pytest.skip("kvmem.patch has no cuda_graph option")
    assert main(["generate", "--quick", "--device", "cpu", "--cuda-graph", "--out", str(tmp_path), "--no-plot"]) == 0
    (path,) = glob.glob(os.path.join(str(tmp_path), "generate_cpu_float32_*.json"))
    with open(path) as f:
        data = json.load(f)
    assert [r["impl"] for r in data["rows"]] == ["hf_default", "kvmem[cuda-graph]"]
    assert all(r["identical"] for r in data["rows"]) and data["args"]["cuda_graph"] is True
    # the kept pool's cache is released by unpatch: its usage must be read before (was 0 B)
    kv = data["rows"][1]
    assert kv["kv_bytes_held"] > 0 and kv["kv_bytes_held"] <= kv["kv_bytes_reserved"]


def test_generate_option_needs_patch_support(monkeypatch, capsys):
    pytest.importorskip("transformers")
    from kvmem import integrations

    monkeypatch.setattr(integrations, "patch", lambda model, *, backend="auto", block_size=16: model)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--quick", "--device", "cpu", "--compile"])
    assert e.value.code == 2 and "no compile_decode option" in capsys.readouterr().err


def test_bench_cascade_script(tmp_path, capsys):
    """benchmarks/bench_cascade.py: plain vs cascade decode interleaved, per-round ratios in the JSON
    (one small case)."""
    import importlib.util as iu

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "bench_cascade.py")
    spec = iu.spec_from_file_location("_kvmem_bench_cascade", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--batch", "4", "--prefix", "256", "--suffix", "20", "--rounds", "2", "--reps", "1",
                     "--out", str(tmp_path)]) == 0
    files = glob.glob(os.path.join(str(tmp_path), "cascade_cpu_float32_*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        data = json.load(f)
    assert data["batch"] == 4 and data["prefix"] == 256 and len(data["ratios"]) == 2
    assert len(data["plain_s"]) == len(data["cascade_s"]) == 2 and data["max_abs_diff"] <= 1e-5
    assert {"gpu", "torch", "load_avg_1m"} <= set(data["machine"])
