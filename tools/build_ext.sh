#!/usr/bin/env bash
# Build the C++ extension kvmem/_C*.so in place, and only when something it is built from changed.
#
#   bash tools/build_ext.sh [python]      (python: the one with torch, default `python`)
#
# Skipped entirely when build/kvmem_ext.stamp matches a hash over csrc/**, setup.py, the torch and
# Python versions and the build environment (TORCH_CUDA_ARCH_LIST, CUDA_HOME, nvcc, CC/CXX/CFLAGS)
# and a kvmem/_C*.so exists. Otherwise `python setup.py build_ext --inplace --force` in the
# persistent build/ folder: ninja recompiles only the sources whose inputs changed (headers
# included, through the depfiles torch writes); --force only bypasses setuptools' own timestamp
# test, which looks at the .cpp/.cu files and misses header edits. MAX_JOBS (ninja's parallelism)
# and TORCH_CUDA_ARCH_LIST are read by setup.py / torch as usual. The log is build/build_ext.log.
# KVMEM_SKIP_EXT=1 means "no extension" here too: nothing is built.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python}"
if [ -n "${KVMEM_SKIP_EXT:-}" ] && [ "${KVMEM_SKIP_EXT}" != 0 ]; then
  echo "build_ext: KVMEM_SKIP_EXT=$KVMEM_SKIP_EXT, not building kvmem._C"
  exit 0
fi
mkdir -p build
stamp=build/kvmem_ext.stamp
log=build/build_ext.log
versions=$("$PY" -c "import importlib.metadata as m, sys; print('torch', m.version('torch'), 'python', sys.version.split()[0])")
want=$(
  {
    echo "kvmem_ext v1 $versions"
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-} nvcc=$(command -v nvcc || true)"
    echo "CC=${CC:-} CXX=${CXX:-} CFLAGS=${CFLAGS:-} CXXFLAGS=${CXXFLAGS:-} LDFLAGS=${LDFLAGS:-}"
    find csrc setup.py -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && compgen -G "kvmem/_C*.so" > /dev/null; then
  echo "build_ext: kvmem._C is up to date ($stamp)"
  exit 0
fi
rm -f "$stamp"
t0=$(date +%s)
echo "build_ext: building kvmem._C in place (MAX_JOBS=${MAX_JOBS:-<torch default>}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>}; log $log)"
if ! "$PY" setup.py build_ext --inplace --force > "$log" 2>&1; then
  echo "build_ext: FAILED after $(( $(date +%s) - t0 ))s; last lines of $log:" >&2
  tail -40 "$log" >&2
  exit 1
fi
compiled=$(grep -cE '^\[[0-9]+/[0-9]+\] .*(c\+\+|g\+\+|nvcc|clang)' "$log" || true)
echo "$want" > "$stamp"
echo "build_ext: kvmem._C built in $(( $(date +%s) - t0 ))s ($compiled files compiled by ninja)"
