"""The C++ CPU kernel's per-ISA code paths vs the reference.

csrc/cpu/paged_attention.cpp compiles its kernel section once per ISA (baseline SSE2, AVX2+FMA,
AVX-512) and picks one at runtime from the CPU, lowered by ``KVMEM_CPU_ISA=baseline|avx2|avx512``
and cached per process. The rest of the suite only runs the best ISA of the machine, so each
value runs here in a fresh subprocess over a reduced product (every dtype, head dim and mode,
page sizes and feature sets rotating, GQA 1/3/8, long split decodes), and the process reports the
ISA it actually selected (``kvmem._C.cpu_isa()``), which must be the one asked for whenever the
CPU has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ORDER = ["baseline", "avx2", "avx512"]


def _child(mode: str) -> None:
    """Runs in the subprocess: report the selected ISA, then (mode 'product') run the cases."""
    import torch

    import kvmem
    from cases import FEATURES, MODES, make_case
    from kvmem import _ext

    if not _ext.has_kernel("paged_attention", "cpu"):
        print(json.dumps({"built": False, "error": _ext.load_error()}))
        return
    from kvmem import _C

    report = {"built": True, "isa": _C.cpu_isa() if hasattr(_C, "cpu_isa") else None, "cases": 0}
    if mode == "product":
        assert kvmem.backends.select(kvmem.backends.Call.paged_attention(
            torch.empty(1, 4, 64), torch.empty(1, 16, 2, 64))).name == "cpu"  # KVMEM_BACKEND=cpu
        features = list(FEATURES)

        from backends import run_and_compare  # tests/ops/backends.py

        def run(case, label):
            run_and_compare(case, f"KVMEM_CPU_ISA={os.environ.get('KVMEM_CPU_ISA')} {label}")
            report["cases"] += 1

        n = 0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # short sequences: no key splits at any thread count
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for head_dim in (64, 80, 96, 112, 128, 256):
                for group in (1, 3, 8):
                    num_kv_heads = 2 if group < 7 else 1
                    block_size = (1, 8, 16, 32, 128)[n % 5]
                    for i, (mode_name, (q_lens, kv_lens)) in enumerate(MODES.items()):
                        for feature in (features[(n + i) % 5], features[(n + i + 2) % 5]):
                            n += 1
                            case = make_case(q_lens, kv_lens, num_heads=group * num_kv_heads,
                                             num_kv_heads=num_kv_heads, head_dim=head_dim,
                                             block_size=block_size, dtype=dtype, strided=n % 2 == 0,
                                             seed=n, **FEATURES[feature])
                            run(case, f"{mode_name}/{feature}")
        torch.set_num_threads(max(2, threads))  # long decodes split their keys over threads
        for dtype in (torch.float32, torch.bfloat16):
            run(make_case([1, 1], [1500, 7], num_heads=8, num_kv_heads=1, head_dim=128, block_size=16,
                          window=700, softcap=20.0, sink=True, dtype=dtype, seed=1), "long decode")
            run(make_case([40, 1], [300, 600], num_heads=6, num_kv_heads=2, head_dim=80, block_size=8,
                          dtype=dtype, seed=2), "long prefill")
    print(json.dumps(report))


def run_child(isa, mode="product"):
    env = dict(os.environ)
    env.pop("KVMEM_CPU_ISA", None)
    if isa is not None:
        env["KVMEM_CPU_ISA"] = isa
    env["KVMEM_BACKEND"] = "cpu"
    paths = [ROOT, HERE, os.path.join(HERE, "ops")]  # kvmem; cases.py; ops/backends.py
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, os.path.abspath(__file__), mode], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"KVMEM_CPU_ISA={isa}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    report = json.loads(res.stdout.strip().splitlines()[-1])
    if not report["built"]:
        if os.environ.get("KVMEM_REQUIRE_EXT") == "1":
            raise RuntimeError(f"KVMEM_REQUIRE_EXT=1 but the C++ CPU ops are missing: {report['error']}")
        pytest.skip(f"C++ extension not built: {report['error']}")
    return report


@pytest.fixture(scope="module")
def best_isa():
    """The ISA this CPU selects when nothing lowers it (None if the build does not say)."""
    return run_child(None, "isa")["isa"]


@pytest.mark.parametrize("isa", ORDER)
def test_isa_vs_reference(isa, best_isa):
    report = run_child(isa)
    assert report["cases"] == 3 * 6 * 3 * 4 * 2 + 4
    if best_isa is None:  # the build does not report its ISA: the cases above still ran
        return
    assert report["isa"] in ORDER, report
    expected = ORDER[min(ORDER.index(isa), ORDER.index(best_isa))]
    assert report["isa"] == expected, (isa, best_isa, report)
    if ORDER.index(isa) > ORDER.index(best_isa):
        pytest.skip(f"this CPU has no {isa}: ran its best ISA, {best_isa}, instead")


def test_unknown_value_keeps_the_best(best_isa):
    """An unknown KVMEM_CPU_ISA value lowers nothing."""
    report = run_child("sse9000", "isa")
    assert report["isa"] == best_isa


if __name__ == "__main__":
    _child(sys.argv[1] if len(sys.argv) > 1 else "product")
