"""pytest configuration for the benchmark suite (``python -m pytest benchmarks --benchmark-only``).

Not part of the unit-test run (pyproject's ``testpaths = ["tests"]``). Registers the ``gpu``
marker (skipped when CUDA is unavailable) and the ``quick`` marker (the small parameter set that
CI runs: ``-k "cpu and quick" --benchmark-disable``; ``KVMEM_BENCH_QUICK=1`` collects only it).
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "quick: the small cases of python -m kvmem.bench --quick (CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
