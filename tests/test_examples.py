"""The examples keep working (each asserts its own result)."""

import os
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



@pytest.mark.parametrize("args, expected", [
    (["examples/passkey.py", "--help"], "--bank {none,extend,exact,streaming}"),
    (["examples/passkey.py", "--depth", "2"], "--depth must be a fraction"),
    (["-m", "kvmem.generate_demo", "--memory-bank", "--help"], "--memory-bank"),
])
def test_passkey_commands_parse_their_arguments(args, expected):
    """examples/passkey.py and ``generate_demo --memory-bank`` parse their arguments (no model run):
    --help exits 0, a bad argument exits 2 with its message."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == (0 if "--help" in args else 2), r.stdout[-2000:] + r.stderr[-2000:]
    assert expected in " ".join((r.stdout + r.stderr).split())
