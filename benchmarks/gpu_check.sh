#!/usr/bin/env bash
# One command that verifies a GPU box without a package registry:
#   offline install + CUDA build, `pytest -m gpu` (every backend vs the reference; the CUDA and
#   the Triton tests in separate processes, never under TRITON_INTERPRET), a compute-sanitizer
#   memcheck of a small subset, decode/prefill timings vs torch SDPA (the CUDA and Triton kernels
#   forced, at the target shape bf16 32/8 heads d=128 page 16, B*ctx = 256k tokens), and
#   verified.json: the CUDA configurations that passed, in the format of kvmem/verified/cuda.json
#   (backend x op x dtype x head dim x page size [x max GQA group], with GPU, driver, torch,
#   triton, date). Everything lands in $OUT (default benchmarks/results/gpu_check_<date>).
#
#   bash benchmarks/gpu_check.sh            # on the GPU box, from anywhere
#
# Uses the torch already installed there (never replaces it): pip --no-build-isolation --no-deps
# --no-index. Needs setuptools>=64 (PEP 660 editable installs; wheel too when setuptools<70.1),
# ninja, pybind11 and nvcc (CUDA_HOME) in that environment.
# Step timeouts (seconds) can be changed: KVMEM_GPU_TEST_TIMEOUT (each pytest step, default
# 1200), KVMEM_MEMCHECK_TIMEOUT (900), KVMEM_BENCH_TIMEOUT (each timing, 900).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The Triton kernels must be compiled for the GPU here: an interpreter setting left in the
# environment would make every launch interpreted (hours) and the verified record meaningless.
unset TRITON_INTERPRET
T_TEST="${KVMEM_GPU_TEST_TIMEOUT:-1200}"
T_MEMCHECK="${KVMEM_MEMCHECK_TIMEOUT:-900}"
T_BENCH="${KVMEM_BENCH_TIMEOUT:-900}"
status=0
step() { echo; echo "== $* ($(date -u +%T))" | tee -a "$OUT/summary.txt"; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }

step "0. machine"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
note "driver ${DRIVER:-unknown}"
"$PY" - <<'PYEOF' | tee -a "$OUT/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
PYEOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "CUDA is not available to torch here: nothing to verify"; exit 1
fi

step "1. offline build (CUDA extension for this GPU's arch only, to save time)"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
note "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-<unset>} nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc?")"
"$PY" - <<'PYEOF' | tee -a "$OUT/summary.txt"
# What an offline `pip install --no-build-isolation -e .` needs from this environment.
import importlib.metadata as md
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
need = {"pip": ">=21.3 (PEP 660 editable installs)", "setuptools": ">=64 (PEP 660 editable installs)",
        "wheel": "any (only for setuptools<70.1)", "ninja": "any", "pybind11": "any", "torch": "with CUDA"}
for name, req in need.items():
    print(f"  {name:10s} {v(name) or 'MISSING':12s} needs {req}")
PYEOF
t0=$(date +%s)
if MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
     --disable-pip-version-check -e . > "$OUT/build.log" 2>&1; then
  note "pip install -e . ok in $(( $(date +%s) - t0 ))s"
else
  note "pip install -e . FAILED (see build.log); last lines:"; tail -25 "$OUT/build.log"
  note "Needs setuptools>=64 (+ wheel when setuptools<70.1), pip>=21.3, ninja, pybind11 and nvcc; without a"
  note "registry they must already be installed. Trying the in-place build instead: python setup.py build_ext --inplace"
  if MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
    note "in-place build ok in $(( $(date +%s) - t0 ))s (kvmem imported from $ROOT via PYTHONPATH)"
  else
    note "BUILD FAILED (see $OUT/build.log)"; tail -40 "$OUT/build.log"; exit 1
  fi
fi
"$PY" -c "import json, kvmem; print(json.dumps(kvmem.build_info()))" | tee "$OUT/build_info.json"
if ! "$PY" - "$OUT/build_info.json" <<'PYEOF'
import json, sys
info = json.load(open(sys.argv[1]))
if not info.get("built"):
    sys.exit(f"kvmem._C did not load: {info.get('error')}")
if not info.get("cuda"):
    sys.exit("kvmem._C was built WITHOUT the CUDA ops (torch without CUDA, or nvcc/CUDA_HOME not found at build "
             "time): set CUDA_HOME to the CUDA toolkit (nvcc in $CUDA_HOME/bin) and rerun")
print("CUDA ops built for", info.get("cuda_archs"))
PYEOF
then
  note "BUILD HAS NO CUDA OPS: stopping (see above and $OUT/build.log)"; exit 1
fi

step "2a. pytest -m gpu tests/test_gpu.py (CUDA and Triton backends vs the reference) -> verified.json"
KVMEM_VERIFY_OUT="$OUT/verified.json" timeout "$T_TEST" "$PY" -m pytest -m gpu -q tests/test_gpu.py \
  --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -30
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  timed_out "$rc" && note "GPU TESTS TIMED OUT after ${T_TEST}s" || note "GPU TESTS FAILED"; status=1
fi
if [ -f "$OUT/verified.json" ]; then
  "$PY" - "$OUT/verified.json" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
for arch, rec in json.load(open(sys.argv[1]))["records"].items():
    ops = {}
    for e in rec["passed"]:
        ops[e["op"]] = ops.get(e["op"], 0) + 1
    print(f"verified.json: {arch} ({rec['gpu']}, driver {rec['driver']}): CUDA entries passed {ops or 'none'}")
PYEOF
  if "$PY" tools/merge_verified.py "$OUT/verified.json" --into "$OUT/cuda.json.merged" > /dev/null; then
    note "To commit the CUDA record (from the repository root):"
    note "  python tools/merge_verified.py $OUT/verified.json && git add kvmem/verified/cuda.json && git commit -m \"verified: CUDA kernels on \$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\" -- kvmem/verified/cuda.json"
  else
    note "verified.json is not in the format of kvmem/verified/cuda.json: NOT mergeable"; status=1
  fi
else
  note "no verified.json written (no CUDA configuration passed, or the tests did not finish)"
fi

step "2b. pytest -m gpu tests/test_triton.py (every Triton config compiled, full product)"
timeout "$T_TEST" "$PY" -m pytest -m gpu -q tests/test_triton.py --junitxml="$OUT/pytest_triton_gpu.xml" \
  -p no:cacheprovider 2>&1 | tee "$OUT/pytest_triton_gpu.txt" | tail -15
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  timed_out "$rc" && note "TRITON GPU TESTS TIMED OUT after ${T_TEST}s" || note "TRITON GPU TESTS FAILED"; status=1
fi

step "2c. HF integration on the GPU (CUDA-graph capture/replay, device_map over 2 GPUs when present)"
if "$PY" -c "import transformers" 2>/dev/null; then
  timeout "$T_TEST" "$PY" -m pytest -m gpu -q tests/test_hf.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_hf_gpu.txt" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || { note "HF GPU TESTS FAILED"; status=1; }
else
  note "transformers not installed: HF GPU tests skipped"
fi

step "3. compute-sanitizer memcheck (small subset)"
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
if [ -z "$SANITIZER" ]; then
  for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
              "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [ -x "$cand" ] && { SANITIZER="$cand"; break; }
  done
fi
if [ -n "$SANITIZER" ]; then
  note "using $SANITIZER"
  # torch's caching allocator hides out-of-bounds accesses inside its cached blocks: off for memcheck.
  if PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$T_MEMCHECK" "$SANITIZER" --tool memcheck --error-exitcode 9 \
       "$PY" tools/sanitize_subset.py > "$OUT/memcheck.txt" 2>&1; then
    note "memcheck clean"
  else
    rc=$?
    timed_out "$rc" && note "MEMCHECK TIMED OUT after ${T_MEMCHECK}s" || note "MEMCHECK FAILED (rc $rc, see memcheck.txt)"
    tail -30 "$OUT/memcheck.txt"; status=1
  fi
else
  note "compute-sanitizer not found (PATH, \${CUDA_HOME:-/usr/local/cuda}/bin): memcheck skipped"
fi

step "4. timing vs torch SDPA (CUDA and Triton kernels forced: the CUDA one is not yet verified)"
# decode: the harness's CUDA sweep is B x ctx = 1x131072, 8x32768, 32x8192, 128x2048 (256k tokens
# each) at bf16, 32 query / 8 KV heads, head dim 128, page 16: the issue's target shape.
timeout "$T_BENCH" "$PY" -m kvmem.bench decode --device cuda --dtype bfloat16 --heads 32 --kv-heads 8 \
  --head-dim 128 --page-size 16 --backends cuda,triton --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { note "DECODE TIMING FAILED OR WRONG (see timing.txt)"; status=1; }
for args in "--quick" "--batch 1 --context 8192"; do
  # shellcheck disable=SC2086
  timeout "$T_BENCH" "$PY" -m kvmem.bench prefill --device cuda --dtype bfloat16 $args --backends triton \
    --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || { note "PREFILL TIMING ($args) FAILED OR WRONG (see timing.txt)"; status=1; }
done
for dt in bfloat16 float16; do
  timeout "$T_BENCH" "$PY" benchmarks/bench_paged_attention.py --device cuda --dtype "$dt" --out "$OUT" 2>&1 \
    | tee -a "$OUT/timing.txt" | tail -12
done

if "$PY" -c "import transformers" 2>/dev/null; then
  # random-weight Llama-3-8B shape: by default 4 of 32 layers, 8k prompt, 64 new tokens (time);
  # KVMEM_GPU_CHECK_FULL=1 runs the issue's case (32 layers, 8k and 32k prompts, 256 new tokens).
  if [ "${KVMEM_GPU_CHECK_FULL:-0}" = 1 ]; then gen_args="--prompts 8192 32768 --new-tokens 256"
  else gen_args="--layers 4 --prompts 8192 --new-tokens 64"; fi
  for graph in "" "--cuda-graph"; do  # eager decode steps, then CUDA-graph-captured ones
    # shellcheck disable=SC2086
    timeout "$T_BENCH" "$PY" -m kvmem.bench generate --device cuda --model random:llama3-8b $gen_args \
      --batch 1 8 $graph --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/timing.txt" | tail -8
    [ "${PIPESTATUS[0]}" -eq 0 ] || { note "GENERATE BENCH ${graph:-eager} FAILED (see timing.txt)"; status=1; }
  done
fi

step "done: status $status, results in $OUT"
exit $status
