"""pytest configuration for the benchmark suite (``python -m pytest benchmarks --benchmark-only``).

Not part of the unit-test run (pyproject's ``testpaths = ["tests"]``). Registers the ``gpu``
marker and skips those cases when CUDA is unavailable.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
