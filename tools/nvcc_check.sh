#!/usr/bin/env bash
# Compile-check every CUDA source with nvcc for sm_80 and sm_90a (compile only: nothing runs);
# fails on any register spill (ptxas -v). Prints the wall time of each compile and the total
# (NVCC_JOBS compiles at a time, default the CPU count; a full build's critical path is the slowest file).
# Usage: bash tools/nvcc_check.sh [python]   (python: one with torch, for its headers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found, skipping CUDA compile check"
  exit 0
fi
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "nvcc_check: no .cu sources yet"
  exit 0
fi
includes=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
pyinc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# Flags as torch.utils.cpp_extension passes them. A CPU torch lacks one generated c10/cuda header: add a shim only when it is missing.
shim=""
if ! "$PY" -c "import torch.utils.cpp_extension as c, os, sys; sys.exit(not any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in c.include_paths()))"; then
  shim="-Itools/nvcc_shim"
fi
out=$(mktemp -d)
fail=0
now() { date +%s.%N; }
t_all=$(now)
# One compile per (source, arch), NVCC_JOBS at a time (default: the CPU count): each writes its log
# and its wall time under $out; the verdicts are printed afterwards, in order.
jobs_max="${NVCC_JOBS:-$(nproc 2>/dev/null || echo 2)}"
archs=("-gencode=arch=compute_80,code=sm_80" "-gencode=arch=compute_90a,code=sm_90a")
compile_one() {  # $1 index, $2 source, $3 arch
  local t_one; t_one=$(now)
  if nvcc -c "$2" -o "$out/$1.o" -std=c++17 -O3 $3 -Icsrc $includes $shim -I"$pyinc" \
       -DKVMEM_WITH_CUDA --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF2_OPERATORS__ \
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -Xptxas=-v \
       >"$out/$1.log" 2>&1; then
    echo ok >"$out/$1.rc"
  else
    echo fail >"$out/$1.rc"
  fi
  awk -v a="$t_one" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }' >"$out/$1.secs"
  rm -f "$out/$1.o"
}
i=0
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
    compile_one "$i" "$src" "$arch" &
    i=$((i + 1))
  done
done
wait
i=0
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    log="$out/$i.log"; secs=$(cat "$out/$i.secs")
    if [ "$(cat "$out/$i.rc")" = ok ]; then
      # ptxas -v: "N bytes spill stores, M bytes spill loads" per kernel; any nonzero fails.
      spills=$({ grep -Eo '[0-9]+ bytes spill (stores|loads)' "$log" || true; } | awk '$1 > 0' | wc -l)
      kernels=$(grep -c 'Compiling entry function' "$log" || true)
      if [ "$spills" -eq 0 ]; then
        echo "nvcc_check: ok   $src ${arch##*code=} ($kernels kernels, 0 spills) ${secs}s"
      else
        echo "nvcc_check: SPILL $src ${arch##*code=} ${secs}s:"
        grep -E "Compiling entry function|[1-9][0-9]* bytes spill" "$log" | grep -B1 -E "[1-9][0-9]* bytes spill" || true
        fail=1
      fi
    else
      echo "nvcc_check: FAIL $src ${arch##*code=}"; cat "$log"; fail=1
    fi
    i=$((i + 1))
  done
done
rm -rf "$out"
echo "nvcc_check: total $(awk -v a="$t_all" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s for ${#sources[@]} sources x 2 archs, $jobs_max at a time (load average $(cut -d' ' -f1 /proc/loadavg))"
exit $fail
