"""Running an op forced onto one backend, for the op tests in this folder (and tests/test_cpu_isa.py).

Backends by name: ``reference`` (``kvmem.ops.reference``, the specification: nothing forced),
``cpu`` (the C++ kernels of ``kvmem._C``), ``triton`` (under the interpreter on CPU tensors, or
compiled on a GPU) and ``cuda`` (the CUDA kernels, GPU only). A test takes its backend through
the ``backend`` fixture of tests/ops/conftest.py, parametrised indirectly::

    @on("cpu")  # = @pytest.mark.parametrize("backend", ["cpu"], indirect=True)
    def test_x(backend): ...  # KVMEM_BACKEND=cpu for the test; skipped when the C++ ops are missing

The GPU tests (marked ``gpu``) append the configurations that passed to :data:`PASSED`; with
``KVMEM_VERIFY_OUT`` set, the session writes them as a verified record (:func:`write_verified_record`).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import kvmem
from kvmem import _ext, verified
from tolerances import assert_close  # tests/tolerances.py

# The interpreter only where there is no GPU (as tests/conftest.py does), before triton is
# imported: on a GPU box the op modules may share a pytest process with the GPU tests, whose
# Triton kernels must be compiled, not interpreted. There the CPU interpreter tests skip unless
# TRITON_INTERPRET=1 is set for the whole run.
if not os.environ.get("KVMEM_TRITON_GPU_CHECK") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

BACKENDS = ("reference", "cpu", "triton", "cuda")
CPU_BUILT = _ext.has_kernel("paged_attention", "cpu")
if not CPU_BUILT and os.environ.get("KVMEM_REQUIRE_EXT") == "1":
    raise RuntimeError(f"KVMEM_REQUIRE_EXT=1 but the C++ CPU ops are missing: {_ext.load_error()}")


def on(*names: str):
    """Parametrise a test over the backends ``names`` (the ``backend`` fixture forces each)."""
    return pytest.mark.parametrize("backend", list(names), indirect=True)


def unavailable(backend: str, on_gpu: bool) -> str | None:
    """Why ``backend`` cannot run here (None: it can). ``on_gpu``: the test is marked ``gpu``
    (CUDA tensors; the marker's own skip covers a box without CUDA)."""
    assert backend in BACKENDS, backend
    if backend == "cpu" and not CPU_BUILT:
        return f"C++ extension not built: {_ext.load_error()}"
    if backend == "triton" and not on_gpu:
        from kvmem.ops._triton import interpreting

        if not interpreting():
            return ("Triton interpreter test (CPU tensors): run with TRITON_INTERPRET=1 "
                    "(set automatically where CUDA is unavailable)")
    return None


def run_and_compare(case, label=""):
    """``kvmem.paged_attention`` on ``case`` (whatever backend the dispatcher takes: force one
    with KVMEM_BACKEND) into a NaN-poisoned ``out`` vs the reference, out and lse."""
    out = torch.full_like(case.q, math.nan)  # poisoned: every element must be written
    got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    ref, ref_lse = case.reference()
    try:
        assert_close(got, ref)
        assert_close(lse, ref_lse, what="lse")
    except AssertionError as e:
        raise AssertionError(f"{label} {case.describe()}\n{e}") from None


# backend -> [{"op", "dtype", "head_dim", "block_size"[, "max_group"]}]: GPU configurations that passed.
PASSED: dict = {}


def write_verified_record(path: str) -> None:
    """The CUDA configurations in :data:`PASSED` to ``path`` in exactly the format of
    kvmem/verified/cuda.json (one record, for this GPU's arch), the Triton ones beside it as
    ``<path>_triton.json`` (information only: Triton needs no record)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    major, minor = torch.cuda.get_device_capability()
    facts = dict(gpu=torch.cuda.get_device_name(), driver=verified.gpu_driver_version(),
                 torch_version=torch.__version__, triton_version=triton_version, cuda_version=torch.version.cuda)
    stem, ext = os.path.splitext(path)
    for backend, target in (("cuda", path), ("triton", f"{stem}_triton{ext or '.json'}")):
        doc = ("CUDA configurations that passed the gpu tests of tests/ops; merge into kvmem/verified/cuda.json "
               f"with `python tools/merge_verified.py {path}`" if backend == "cuda" else
               "Triton configurations that passed the gpu tests of tests/ops (information only)")
        rec = verified.make_record(f"sm_{major}{minor}", PASSED.get(backend, []), doc=doc, **facts)
        with open(target, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
