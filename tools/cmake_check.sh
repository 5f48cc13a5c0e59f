#!/usr/bin/env bash
# CMakeLists.txt check (CI): configure and build the CPU library (libkvmem_C.so: csrc/torch_bindings.cpp
# + csrc/common/*.cpp + csrc/<op>/cpu.cpp) with CMake against the venv's torch, then load it with torch.ops.load_library in
# a fresh process (kvmem._C never imported) and check its ops against kvmem.ops.reference.
#
#   bash tools/cmake_check.sh [python]      (default .venv/bin/python; MAX_JOBS default 2)
#
# The build directory (build/cmake-check, git-ignored; KVMEM_CMAKE_BUILD overrides) is kept, so a
# second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
BUILD="${KVMEM_CMAKE_BUILD:-build/cmake-check}"
JOBS="${MAX_JOBS:-2}"
t0=$(date +%s)

# cmake and ninja: the system's, else the venv's (pip wheels, installed on demand).
VENV_BIN="$(dirname "$PY")"
export PATH="$VENV_BIN:$PATH"
if ! command -v cmake >/dev/null; then
  echo "cmake_check: no cmake on PATH; installing the cmake wheel into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install -q cmake
fi
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
echo "cmake_check: $(cmake --version | head -1); torch $("$PY" -c 'import torch; print(torch.__version__)') at $TORCH_PREFIX"

mkdir -p "$(dirname "$BUILD")"
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$TORCH_PREFIX/Torch" \
  -DKVMEM_CUDA=OFF -Wno-dev > "$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; echo "cmake_check: configure failed" >&2; exit 1; }
cmake --build "$BUILD" -j "$JOBS" > "$BUILD.build.log" 2>&1 \
  || { tail -100 "$BUILD.build.log"; echo "cmake_check: build failed" >&2; exit 1; }
LIB="$(find "$BUILD" -maxdepth 1 -name 'libkvmem_C*.so' -o -maxdepth 1 -name 'libkvmem_C*.dylib' | head -1)"
[ -n "$LIB" ] || { echo "cmake_check: no libkvmem_C built in $BUILD" >&2; exit 1; }
echo "cmake_check: built $LIB in $(( $(date +%s) - t0 ))s"

KVMEM_CMAKE_LIB="$LIB" "$PY" - <<'EOF'
import math
import os
import sys

import torch

torch.ops.load_library(os.environ["KVMEM_CMAKE_LIB"])
ops = torch.ops.kvmem_C
assert torch._C._dispatch_has_kernel_for_dispatch_key("kvmem_C::paged_attention", "CPU")

sys.path.insert(0, os.getcwd())
from kvmem.ops import reference  # noqa: E402  (pure PyTorch; does not load kvmem._C)

g = torch.Generator().manual_seed(0)
Hq, Hkv, D, bs, num_blocks = 8, 2, 128, 16, 12
q_lens, kv_lens = [5, 1, 1], [37, 70, 9]
k_cache = torch.full((num_blocks, bs, Hkv, D), math.nan)
v_cache = torch.full_like(k_cache, math.nan)
perm = torch.randperm(num_blocks, generator=g).tolist()
table = torch.full((3, 6), -1, dtype=torch.int32)
ks, vs, slots = [], [], []
for b, n in enumerate(kv_lens):
    for i in range(-(-n // bs)):
        table[b, i] = perm.pop()
    slots += [int(table[b, t // bs]) * bs + t % bs for t in range(n)]
    ks.append(torch.randn(n, Hkv, D, generator=g))
    vs.append(torch.randn(n, Hkv, D, generator=g))
k, v, slots = torch.cat(ks), torch.cat(vs), torch.tensor(slots)
slots[3] = -1  # a padding token: not written
ref_k, ref_v = k_cache.clone(), v_cache.clone()
reference.cache_write(k, v, ref_k, ref_v, slots)
ops.cache_write(k, v, k_cache, v_cache, slots, None, None)
torch.testing.assert_close(k_cache, ref_k, equal_nan=True, atol=0, rtol=0)
torch.testing.assert_close(v_cache, ref_v, equal_nan=True, atol=0, rtol=0)
k_cache[table[0, 0], 3] = torch.randn(Hkv, D, generator=g)  # the padded slot: give it a key
v_cache[table[0, 0], 3] = torch.randn(Hkv, D, generator=g)

q = torch.randn(sum(q_lens), Hq, D, generator=g)
seq_lens = torch.tensor(kv_lens, dtype=torch.int32)
cu = torch.tensor([0, 5, 6, 7], dtype=torch.int32)
sink = torch.randn(Hq, generator=g)
scale, window, softcap = 1 / math.sqrt(D), 30, 20.0
out = torch.full_like(q, math.nan)
lse = torch.full((q.shape[0], Hq), math.nan)
# RoPE on load (keys cached before rotary embedding): a [positions, rot_dim] cos|sin table.
rot = q.shape[-1] // 2
angles = torch.arange(max(kv_lens) + 1.0)[:, None] / 10000.0 ** (torch.arange(0, rot, 2.0) / rot)
rope = torch.cat([angles.cos(), angles.sin()], dim=-1)
ops.paged_attention(out, lse, q, k_cache, v_cache, table, seq_lens, cu, max(q_lens), max(kv_lens),
                    scale, True, window, softcap, sink, None, None, rope, True)
ref, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, seq_lens, cu, max(q_lens), max(kv_lens),
                                         scale=scale, causal=True, window=window, softcap=softcap,
                                         sink_logits=sink, rope_cos_sin=rope, rope_neox=True)
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from tolerances import assert_close  # noqa: E402

assert_close(out, ref)
assert_close(lse, ref_lse, what="lse")
# a float8 e4m3 cache with per-head scales: the same encoding bits, dequantised on load
sc = torch.rand(Hkv, generator=g) * 0.01 + 0.005
k8 = torch.full(k_cache.shape, math.nan).to(torch.float8_e4m3fn)
v8, rk8, rv8 = k8.clone(), k8.clone(), k8.clone()
k_all, v_all, slots_all = k.clone(), v.clone(), slots.clone()  # the once-padded slot holds a key by now
slots_all[3] = int(table[0, 0]) * bs + 3
k_all[3], v_all[3] = k_cache[table[0, 0], 3], v_cache[table[0, 0], 3]
reference.cache_write(k_all, v_all, rk8, rv8, slots_all, sc, sc)
ops.cache_write(k_all, v_all, k8, v8, slots_all, sc, sc)
assert torch.equal(k8.view(torch.uint8), rk8.view(torch.uint8)) and torch.equal(v8.view(torch.uint8), rv8.view(torch.uint8))
ops.paged_attention(out, lse, q, k8, v8, table, seq_lens, cu, max(q_lens), max(kv_lens),
                    scale, True, window, softcap, sink, sc, sc, rope, True)
ref8, _ = reference.paged_attention(q, k8, v8, table, seq_lens, cu, max(q_lens), max(kv_lens), scale=scale,
                                    causal=True, window=window, softcap=softcap, sink_logits=sink,
                                    k_scale=sc, v_scale=sc, rope_cos_sin=rope, rope_neox=True)
assert_close(out, ref8)
assert "kvmem._C" not in sys.modules, "the check must run the CMake-built library, not kvmem._C"
print(f"cmake_check: torch.ops.load_library({os.path.basename(os.environ['KVMEM_CMAKE_LIB'])}): "
      f"cache_write and paged_attention (RoPE on load; fp8 e4m3 with scales) match the reference (fp8: max |out - ref| = {(out - ref8).abs().max():.2e})")
EOF
echo "cmake_check: OK in $(( $(date +%s) - t0 ))s"
