"""Every GPU backend vs the reference on a real GPU, over the full product (marked ``gpu``).

With ``KVMEM_VERIFY_OUT=path.json`` the passing configurations are written there, in the format
of kvmem/verified/cuda.json (benchmarks/gpu_check.sh does this).
"""

import json
import math
import os

import pytest
import torch

import kvmem
from cases import FEATURES, MODES, make_case
from kvmem import backends
from kvmem.ops import reference
from tolerances import assert_close

pytestmark = pytest.mark.gpu
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSED = {}


@pytest.fixture(scope="module", autouse=True)
def _write_record():
    yield
    path = os.environ.get("KVMEM_VERIFY_OUT")
    if path and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        record = {"gpu": torch.cuda.get_device_name(), "driver": torch.version.cuda, "torch": torch.__version__,
                  "triton": triton_version, "passed": {}}
        for backend, entries in PASSED.items():
            record["passed"][backend] = sorted(entries, key=lambda e: tuple(str(v) for v in e.values()))
        with open(path, "w") as f:
            json.dump({"arch": arch, **record}, f, indent=1)


def _force(monkeypatch, backend):
    monkeypatch.setenv("KVMEM_BACKEND", backend)


def _supported(backend, dtype):
    return not (backend == "cuda" and dtype == torch.float32)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 128])
def test_paged_attention_gpu(monkeypatch, backend, dtype_name, head_dim, block_size):
    dtype = DTYPES[dtype_name]
    if not _supported(backend, dtype):
        pytest.skip(f"{backend} has no {dtype_name} paged_attention")
    _force(monkeypatch, backend)
    seed = 0
    for group in (1, 3, 4, 7, 8):
        hkv = 2 if group < 7 else 1
        for mode, (q_lens, kv_lens) in MODES.items():
            if backend == "cuda" and max(q_lens) > backends.DECODE_MAX_Q:
                continue  # prefill is not the CUDA decode kernel's job
            for feature, feats in FEATURES.items():
                seed += 1
                case = make_case(q_lens, kv_lens, num_heads=group * hkv, num_kv_heads=hkv, head_dim=head_dim,
                                 block_size=block_size, dtype=dtype, strided=seed % 2 == 0, seed=seed,
                                 device="cuda", **feats)
                out = torch.full_like(case.q, math.nan)
                got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, out=out, return_lse=True)
                ref, ref_lse = case.reference()
                assert_close(got, ref)
                assert_close(lse, ref_lse, what="lse")
    # long decode: many splits
    case = make_case([1, 1, 1], [4000, 17, 1500], num_heads=8, num_kv_heads=2, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, seed=99, device="cuda", sink=True)
    got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, return_lse=True)
    ref, ref_lse = case.reference()
    assert_close(got, ref)
    assert_close(lse, ref_lse, what="lse")
    PASSED.setdefault(backend, []).append(
        {"op": "paged_attention", "dtype": dtype_name, "head_dim": head_dim, "block_size": block_size})


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
def test_cache_write_and_merge_gpu(monkeypatch, backend, dtype_name, head_dim):
    dtype = DTYPES[dtype_name]
    _force(monkeypatch, backend)
    g = torch.Generator().manual_seed(head_dim)
    for block_size in (1, 16, 128):
        k_cache = torch.full((7, block_size, 3, head_dim), math.nan, dtype=dtype)
        v_cache = torch.full_like(k_cache, math.nan)
        packed = torch.randn(20, 8, head_dim, generator=g).to(dtype)
        k, v = packed[:, :3], packed[:, 3:6]
        slots = torch.randperm(7 * block_size, generator=g)[:20] if 7 * block_size >= 20 else \
            torch.cat([torch.randperm(7 * block_size, generator=g), torch.full((20 - 7 * block_size,), -1)])
        slots[::4] = -1
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        reference.cache_write(k, v, ref_k, ref_v, slots)
        kc, vc = k_cache.cuda(), v_cache.cuda()
        kvmem.cache_write(k.cuda(), v.cuda(), kc, vc, slots.cuda())
        torch.testing.assert_close(kc.cpu(), ref_k, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(vc.cpu(), ref_v, equal_nan=True, atol=0, rtol=0)
    out_a, out_b = (torch.randn(33, 5, head_dim, generator=g).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(33, 5, generator=g) * 3 for _ in range(2))
    lse_a[0], lse_b[1] = -math.inf, -math.inf
    out_a[0], out_b[1] = math.nan, math.nan
    lse_a[2], lse_b[2] = -math.inf, -math.inf
    out, lse = kvmem.merge_states(out_a.cuda(), lse_a.cuda(), out_b.cuda(), lse_b.cuda())
    ref, ref_lse = reference.merge_states(out_a, lse_a, out_b, lse_b)
    assert_close(out.cpu(), ref)
    assert_close(lse.cpu(), ref_lse, what="lse")
    for op in ("cache_write", "merge_states"):
        PASSED.setdefault(backend, []).append({"op": op, "dtype": dtype_name, "head_dim": head_dim, "block_size": 0})
