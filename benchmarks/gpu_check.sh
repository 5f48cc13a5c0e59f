#!/usr/bin/env bash
# One command that verifies a GPU box without a package registry, inside ONE 10-minute command on
# an H100/H200, the build included:
#   the CUDA extension built in place for this GPU's arch only (parallel ninja), then, most
#   valuable first: `pytest -m gpu` of the CUDA and Triton kernels (every backend vs the reference;
#   the CUDA and the Triton tests in separate processes, never under TRITON_INTERPRET) ->
#   verified.json (the CUDA configurations that passed, in the format of kvmem/verified/cuda.json:
#   backend x op x dtype x head dim x page size [x max GQA group], with GPU, driver, torch,
#   triton, date); the decode/prefill timings vs torch SDPA (the CUDA and Triton kernels forced, at
#   the target shape bf16 32/8 heads d=128 page 16, B*ctx = 256k tokens); the HF integration on the
#   GPU; the timing tables and generate(); a compute-sanitizer memcheck of a small subset last.
#
#   bash benchmarks/gpu_check.sh [--configs quick|full]     # on the GPU box, from anywhere
#
# Everything lands in $OUT (default benchmarks/results/gpu_check_<date>) as it goes: summary.txt,
# steps.tsv (step, status, exit code, seconds), one log per step, build_info.json, verified.json;
# a run cut short still leaves what it did. Each step's time is printed.
#
# Deadline watchdog: KVMEM_GPU_CHECK_DEADLINE_S (default 570) seconds from the script's start.
# A step is started only when its estimate (EST_* below) fits the time left; it then runs under
# `timeout` for at most its own limit and the time left, so the run ends by the deadline.
# Exit status: 0 all steps done and passed; 1 a step failed or timed out; 3 none failed, but the
# watchdog skipped some.
#
# --configs quick: the shortest run. Exported to the tests as KVMEM_GPU_CONFIGS=quick, meaning
#   head dims 64 and 128, bfloat16 only (tests that read KVMEM_GPU_CONFIGS restrict their
#   parametrisation to that; "full" or unset = everything); the timing steps run bf16 only and
#   generate() eager only. --configs full (default): everything.
#
# Test files are named once, below (KVMEM_GPU_TESTS_* override them); a path that does not exist
# is dropped, and when none is left the step runs `pytest -m gpu tests` instead.
# Uses the torch already installed there (never replaces it) and builds with
# `python setup.py build_ext --inplace` (tools/build_ext.sh: skipped when nothing changed since the
# last build on this machine); kvmem is imported from this tree through PYTHONPATH. Needs
# setuptools, ninja, pybind11 and nvcc (CUDA_HOME) in that environment.
# Per-step limits (seconds): KVMEM_GPU_TEST_TIMEOUT (each pytest step, default 1200),
# KVMEM_MEMCHECK_TIMEOUT (900), KVMEM_BENCH_TIMEOUT (each timing, 900); the deadline caps them all.
set -uo pipefail
SCRIPT_START=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
ROOT="$PWD"

# ---- the test files each step runs (one place to edit when tests move) ----
# CUDA + Triton vs the reference -> verified.json (the gpu tests of each op's files; one process)
# (test_kv_quant_gpu.py: float8 / other-dtype caches, cache_write bit-exact and decode vs the reference,
# recorded with their cache_dtype / kv_scale)
TESTS_KERNELS="${KVMEM_GPU_TESTS_KERNELS:-tests/ops/test_paged_attention_gpu.py tests/ops/test_cache_write.py tests/ops/test_merge_states.py tests/ops/test_kv_quant_gpu.py}"
TESTS_TRITON="${KVMEM_GPU_TESTS_TRITON:-tests/ops/test_paged_attention_triton.py}"  # every Triton config compiled, full product
TESTS_HF="${KVMEM_GPU_TESTS_HF:-tests/test_hf.py}"              # CUDA-graph capture/replay, device_map

# ---- estimates (seconds) the watchdog plans with: rough, for an H100/H200 with 16 cores; each
# can be set from the environment (KVMEM_GPU_EST_KERNELS=...). The build always runs (nothing
# else can run without it): its estimate is only printed. ----
EST_BUILD="${KVMEM_GPU_EST_BUILD:-300}" EST_KERNELS="${KVMEM_GPU_EST_KERNELS:-200}"
EST_TRITON="${KVMEM_GPU_EST_TRITON:-150}" EST_DECODE="${KVMEM_GPU_EST_DECODE:-60}"
EST_PREFILL="${KVMEM_GPU_EST_PREFILL:-45}" EST_HF="${KVMEM_GPU_EST_HF:-60}"
EST_TABLE="${KVMEM_GPU_EST_TABLE:-60}" EST_GENERATE="${KVMEM_GPU_EST_GENERATE:-90}"
EST_MEMCHECK="${KVMEM_GPU_EST_MEMCHECK:-150}"

CONFIGS="${KVMEM_GPU_CONFIGS:-full}"
while [ $# -gt 0 ]; do
  case "$1" in
    --configs) CONFIGS="${2:-}"; shift 2 || { echo "--configs needs quick|full" >&2; exit 2; } ;;
    --configs=*) CONFIGS="${1#--configs=}"; shift ;;
    -h|--help) sed -n '2,40p' "$0" | sed -n '/^#/p' | sed 's/^# //; s/^#//'; exit 0 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--configs quick|full]" >&2; exit 2 ;;
  esac
done
case "$CONFIGS" in quick|full) ;; *) echo "--configs: quick or full, not '$CONFIGS'" >&2; exit 2 ;; esac
export KVMEM_GPU_CONFIGS="$CONFIGS"
if [ "$CONFIGS" = quick ]; then  # the quick subset's defaults (an explicit KVMEM_GPU_EST_* still wins)
  EST_KERNELS="${KVMEM_GPU_EST_KERNELS:-90}" EST_TRITON="${KVMEM_GPU_EST_TRITON:-90}"
  EST_TABLE="${KVMEM_GPU_EST_TABLE:-30}" EST_GENERATE="${KVMEM_GPU_EST_GENERATE:-60}"
fi

OUT="${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The Triton kernels must be compiled for the GPU here: an interpreter setting left in the
# environment would make every launch interpreted (hours) and the verified record meaningless.
unset TRITON_INTERPRET
DEADLINE="${KVMEM_GPU_CHECK_DEADLINE_S:-570}"
T_TEST="${KVMEM_GPU_TEST_TIMEOUT:-1200}"
T_MEMCHECK="${KVMEM_MEMCHECK_TIMEOUT:-900}"
T_BENCH="${KVMEM_BENCH_TIMEOUT:-900}"
status=0 skipped=0
printf "step\tstatus\trc\tseconds\n" > "$OUT/steps.tsv"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }
elapsed() { echo $(( $(date +%s) - SCRIPT_START )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }
STEP="" STEP_T0=0
# begin NAME EST: start step NAME when EST seconds fit before the deadline; else record it skipped.
begin() {
  STEP="$1"; local est="$2" remaining; remaining=$(left)
  echo; echo "== $STEP (at $(elapsed)s, $(date -u +%T), ${remaining}s left)" | tee -a "$OUT/summary.txt"
  if [ "$remaining" -lt "$est" ]; then
    note "SKIPPED by the deadline watchdog: needs ~${est}s, ${remaining}s left (KVMEM_GPU_CHECK_DEADLINE_S=$DEADLINE)"
    printf "%s\tskipped\t-\t0\n" "$STEP" >> "$OUT/steps.tsv"
    skipped=$(( skipped + 1 ))
    return 1
  fi
  STEP_T0=$(date +%s)
}
# finish RC [WHAT]: record the step's outcome and time; a failure makes the run's status 1.
finish() {
  local rc="$1" what="${2:-$STEP}" secs=$(( $(date +%s) - STEP_T0 )) verdict=ok
  if [ "$rc" -ne 0 ]; then
    if timed_out "$rc"; then verdict=timeout; note "$what TIMED OUT (deadline or step limit) after ${secs}s"
    else verdict=failed; note "$what FAILED (rc $rc)"; fi
    status=1
  fi
  printf "%s\t%s\t%s\t%s\n" "$what" "$verdict" "$rc" "$secs" >> "$OUT/steps.tsv"
  note "-- $what: $verdict in ${secs}s"
}
# limit STEP_LIMIT: the timeout for a command, its own limit capped by the time left.
limit() { local l; l=$(left); [ "$1" -lt "$l" ] && l="$1"; [ "$l" -lt 1 ] && l=1; echo "$l"; }
# existing PATHS...: the paths that exist (tests may move); empty when none does.
existing() { local p found=(); for p in "$@"; do [ -e "$p" ] && found+=("$p"); done; echo "${found[*]:-}"; }
# pytest_gpu LOGNAME TESTS [pytest args...]: `pytest -m gpu` over TESTS (or over tests/ when none
# of them exists), logged to $OUT/LOGNAME.txt, under the step's time limit.
pytest_gpu() {
  local log="$1" tests; shift
  # shellcheck disable=SC2086  # $1: one or more paths, split on purpose
  tests=$(existing $1); shift
  [ -n "$tests" ] || { note "test files moved? none of the configured ones exists: running -m gpu over tests/"; tests=tests; }
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$(limit "$T_TEST")" "$PY" -m pytest -m gpu -q $tests -p no:cacheprovider "$@" 2>&1 \
    | tee "$OUT/$log.txt" | tail -30
  return "${PIPESTATUS[0]}"
}

echo "== gpu_check: configs=$CONFIGS, deadline ${DEADLINE}s, results in $OUT" | tee -a "$OUT/summary.txt"
begin "0. machine" 0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
note "driver ${DRIVER:-unknown}, $(nproc) cores"
"$PY" - <<'PYEOF' | tee -a "$OUT/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
import importlib.metadata as md
for name in ("setuptools", "ninja", "pybind11"):
    try:
        print(f"  {name:10s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:10s} MISSING (needed for the build)")
PYEOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "CUDA is not available to torch here: nothing to verify"; finish 1; exit 1
fi
finish 0

begin "1. build (CUDA extension in place, this GPU's arch only, MAX_JOBS=${MAX_JOBS:-$(nproc)}; estimate ${EST_BUILD}s)" 1 || exit 1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
note "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-<unset>} nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc?")"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout --kill-after=10 "$(left)" bash tools/build_ext.sh "$PY" 2>&1 | tee -a "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
cp -f build/build_ext.log "$OUT/build.log" 2>/dev/null || true
if [ "$rc" -ne 0 ]; then finish "$rc" "1. build"; note "BUILD FAILED (see $OUT/build.log)"; exit 1; fi
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
  finish 1 "1. build"; note "BUILD HAS NO CUDA OPS: stopping (see above and $OUT/build.log)"; exit 1
fi
finish 0

if begin "2a. pytest -m gpu $TESTS_KERNELS (CUDA and Triton kernels vs the reference) -> verified.json" "$EST_KERNELS"; then
  KVMEM_VERIFY_OUT="$OUT/verified.json" pytest_gpu pytest_gpu "$TESTS_KERNELS" --junitxml="$OUT/pytest_gpu.xml"
  finish $? "2a. kernel tests"
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
fi

if begin "2b. pytest -m gpu $TESTS_TRITON (every Triton config compiled, full product)" "$EST_TRITON"; then
  pytest_gpu pytest_triton_gpu "$TESTS_TRITON" --junitxml="$OUT/pytest_triton_gpu.xml"
  finish $? "2b. Triton GPU tests"
fi

# decode: the harness's CUDA sweep is B x ctx = 1x131072, 8x32768, 32x8192, 128x2048 (256k tokens
# each) at bf16, 32 query / 8 KV heads, head dim 128, page 16: the issue's target shape.
if begin "3. decode timing vs torch SDPA (CUDA and Triton kernels forced: the CUDA one is not yet verified)" "$EST_DECODE"; then
  timeout --kill-after=10 "$(limit "$T_BENCH")" "$PY" -m kvmem.bench decode --device cuda --dtype bfloat16 --heads 32 \
    --kv-heads 8 --head-dim 128 --page-size 16 --backends cuda,triton --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -25
  finish "${PIPESTATUS[0]}" "3. decode timing"
fi

for args in "--quick" "--batch 1 --context 8192"; do
  if begin "4. prefill timing ($args)" "$EST_PREFILL"; then
    # shellcheck disable=SC2086
    timeout --kill-after=10 "$(limit "$T_BENCH")" "$PY" -m kvmem.bench prefill --device cuda --dtype bfloat16 $args \
      --backends triton --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -12
    finish "${PIPESTATUS[0]}" "4. prefill timing ($args)"
  fi
done

if "$PY" -c "import transformers" 2>/dev/null; then HAVE_HF=1; else HAVE_HF=0; fi
if begin "5. HF integration on the GPU (CUDA-graph capture/replay, device_map over 2 GPUs when present)" "$EST_HF"; then
  if [ "$HAVE_HF" = 1 ]; then
    pytest_gpu pytest_hf_gpu "$TESTS_HF"
    finish $? "5. HF GPU tests"
  else
    note "transformers not installed: HF GPU tests skipped"; finish 0 "5. HF GPU tests (skipped: no transformers)"
  fi
fi

table_dtypes="bfloat16 float16"; [ "$CONFIGS" = quick ] && table_dtypes="bfloat16"
for dt in $table_dtypes; do
  if begin "6. timing table benchmarks/bench_paged_attention.py ($dt)" "$EST_TABLE"; then
    timeout --kill-after=10 "$(limit "$T_BENCH")" "$PY" benchmarks/bench_paged_attention.py --device cuda --dtype "$dt" \
      --out "$OUT" 2>&1 | tee -a "$OUT/timing.txt" | tail -12
    finish "${PIPESTATUS[0]}" "6. timing table ($dt)"
  fi
done

if [ "$HAVE_HF" = 1 ]; then
  # random-weight Llama-3-8B shape: by default 4 of 32 layers, 8k prompt, 64 new tokens (time);
  # KVMEM_GPU_CHECK_FULL=1 runs the issue's case (32 layers, 8k and 32k prompts, 256 new tokens).
  if [ "${KVMEM_GPU_CHECK_FULL:-0}" = 1 ]; then gen_args="--prompts 8192 32768 --new-tokens 256"
  else gen_args="--layers 4 --prompts 8192 --new-tokens 64"; fi
  graphs=("" "--cuda-graph"); [ "$CONFIGS" = quick ] && graphs=("")
  for graph in "${graphs[@]}"; do  # eager decode steps, then CUDA-graph-captured ones
    if begin "7. generate() timing (${graph:-eager})" "$EST_GENERATE"; then
      # shellcheck disable=SC2086
      timeout --kill-after=10 "$(limit "$T_BENCH")" "$PY" -m kvmem.bench generate --device cuda --model random:llama3-8b \
        $gen_args --batch 1 8 $graph --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/timing.txt" | tail -8
      finish "${PIPESTATUS[0]}" "7. generate timing (${graph:-eager})"
    fi
  done
fi

if begin "8. compute-sanitizer memcheck (small subset)" "$EST_MEMCHECK"; then
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
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=10 "$(limit "$T_MEMCHECK")" "$SANITIZER" --tool memcheck \
      --error-exitcode 9 "$PY" tools/sanitize_subset.py > "$OUT/memcheck.txt" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then note "memcheck clean"; else tail -30 "$OUT/memcheck.txt"; fi
    finish "$rc" "8. memcheck"
  else
    note "compute-sanitizer not found (PATH, \${CUDA_HOME:-/usr/local/cuda}/bin): memcheck skipped"
    finish 0 "8. memcheck (skipped: no compute-sanitizer)"
  fi
fi

# 1: a step failed or timed out; 3: nothing failed but the deadline skipped steps; 0: all done.
if [ "$status" -eq 0 ] && [ "$skipped" -gt 0 ]; then status=3; fi
echo; note "== done at $(elapsed)s: status $status, $skipped step(s) skipped by the deadline, results in $OUT"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
exit $status
