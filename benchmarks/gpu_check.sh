#!/usr/bin/env bash
# One command that verifies a GPU box without a package registry:
#   offline install + CUDA build, `pytest -m gpu` (every backend vs the reference), a
#   compute-sanitizer memcheck of a small subset, a quick decode/prefill timing vs torch SDPA,
#   and verified.json (backend x op x dtype x head dim x page size -> passed, with GPU, driver,
#   torch, triton). Everything lands in $OUT (default benchmarks/results/gpu_check_<date>).
#
#   bash benchmarks/gpu_check.sh            # on the GPU box, from the repository root
#
# Uses the torch already installed there (never replaces it): pip --no-build-isolation --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0
step() { echo; echo "== $* ($(date -u +%T))" | tee -a "$OUT/summary.txt"; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

step "0. machine"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" - <<'PYEOF' | tee -a "$OUT/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
PYEOF

step "1. build (CUDA extension for this GPU's arch only, to save time)"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
note "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
t0=$(date +%s)
if MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  note "build ok in $(( $(date +%s) - t0 ))s"
else
  note "BUILD FAILED (see build.log)"; tail -50 "$OUT/build.log"; exit 1
fi
"$PY" -c "import json, kvmem; print(json.dumps(kvmem.build_info()))" | tee "$OUT/build_info.json"

step "2. pytest -m gpu (every backend vs the reference) -> verified.json"
KVMEM_VERIFY_OUT="$OUT/verified.json" "$PY" -m pytest -m gpu -q tests/test_gpu.py tests/test_triton.py \
  --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || { note "GPU TESTS FAILED"; status=1; }

step "2b. HF integration on the GPU (CUDA-graph capture/replay, device_map over 2 GPUs when present)"
if "$PY" -c "import transformers" 2>/dev/null; then
  "$PY" -m pytest -m gpu -q tests/test_hf.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_hf_gpu.txt" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || { note "HF GPU TESTS FAILED"; status=1; }
else
  note "transformers not installed: HF GPU tests skipped"
fi

step "3. compute-sanitizer memcheck (small subset)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  if compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" tools/sanitize_subset.py > "$OUT/memcheck.txt" 2>&1; then
    note "memcheck clean"
  else
    note "MEMCHECK FAILED (see memcheck.txt)"; tail -30 "$OUT/memcheck.txt"; status=1
  fi
else
  note "compute-sanitizer not found: memcheck skipped"
fi

step "4. quick timing vs torch SDPA"
for dt in bfloat16 float16; do
  "$PY" benchmarks/bench_paged_attention.py --device cuda --dtype "$dt" --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -12
done
if "$PY" -c "import kvmem.bench.__main__" 2>/dev/null; then
  "$PY" -m kvmem.bench decode --quick --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -20
fi

if "$PY" -c "import transformers" 2>/dev/null; then  # random-weight Llama-3-8B shape (4 of 32 layers: time)
  "$PY" -m kvmem.bench generate --device cuda --model random:llama3-8b --layers 4 --prompts 8192 \
    --batch 1 8 --new-tokens 64 --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/timing.txt" | tail -8
fi

step "done: status $status, results in $OUT"
exit $status
