"""Fixtures of the op tests: ``backend`` (the op forced onto one backend) and the GPU record."""

import os

import pytest
import torch

from backends import PASSED, unavailable, write_verified_record


@pytest.fixture
def backend(request, monkeypatch):
    """The backend named by the test's (indirect) parametrisation, forced with KVMEM_BACKEND
    (``reference``: nothing forced); the test skips when that backend cannot run here."""
    name = request.param
    why = unavailable(name, on_gpu="gpu" in request.keywords)
    if why:
        pytest.skip(why)
    if name != "reference":
        monkeypatch.setenv("KVMEM_BACKEND", name)
    return name


@pytest.fixture(scope="session", autouse=True)
def _write_verified_record():
    """With ``KVMEM_VERIFY_OUT=path.json`` (benchmarks/gpu_check.sh), the GPU configurations that
    passed, written at the end of the session (tools/merge_verified.py merges the CUDA record)."""
    yield
    path = os.environ.get("KVMEM_VERIFY_OUT")
    if path and torch.cuda.is_available() and PASSED:
        write_verified_record(path)
