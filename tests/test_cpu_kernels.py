"""C++ CPU kernels (through the public ops, forced with KVMEM_BACKEND=cpu) vs the reference,
over the full product of page sizes, GQA ratios, head dims, dtypes, modes and features."""

import math
import os

import pytest
import torch

import kvmem
from cases import FEATURES, MODES, make_case
from kvmem import _ext
from kvmem.ops import reference
from tolerances import assert_close

BUILT = _ext.has_kernel("paged_attention", "cpu")
if not BUILT and os.environ.get("KVMEM_REQUIRE_EXT") == "1":
    raise RuntimeError(f"KVMEM_REQUIRE_EXT=1 but the C++ CPU ops are missing: {_ext.load_error()}")
pytestmark = pytest.mark.skipif(not BUILT, reason=f"C++ extension not built: {_ext.load_error()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _force_cpu(monkeypatch):
    monkeypatch.setenv("KVMEM_BACKEND", "cpu")


def run_and_compare(case, label=""):
    out = torch.full_like(case.q, math.nan)  # poisoned: every element must be written
    got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    ref, ref_lse = case.reference()
    try:
        assert_close(got, ref)
        assert_close(lse, ref_lse, what="lse")
    except AssertionError as e:
        raise AssertionError(f"{label} {case.describe()}\n{e}") from None


@pytest.fixture
def one_thread():
    """Run with one intra-op thread. The product's sequences are short (<= 70 keys), so the kernel
    never splits their key ranges (it splits only with > 1 thread and >= 512 keys) and its result
    does not depend on the thread count, while tiny ops with 2 threads on a loaded 2-core box
    cost ~10x more. Thread-parallel paths: test_threaded_modes_and_features and the long tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def modes_times_features(dtype, head_dim, block_size, group, seed0=0):
    """Every mode x every feature set for one (dtype, head dim, page size, group)."""
    num_kv_heads = 2 if group < 7 else 1
    seed = seed0
    for mode, (q_lens, kv_lens) in MODES.items():
        for feature, extra in FEATURES.items():
            seed += 1
            case = make_case(q_lens, kv_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, block_size=block_size, dtype=dtype, strided=seed % 2 == 0,
                             seed=seed, **extra)
            run_and_compare(case, f"{mode}/{feature}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
def test_paged_attention_product(dtype, head_dim, block_size, group, one_thread):
    """The full product: every (dtype, head dim, page size, group) runs every mode with every
    feature set (20 cases per test, 9000 in all), q and the caches strided in every other case."""
    modes_times_features(dtype, head_dim, block_size, group, seed0=head_dim + block_size + 7 * group)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threaded_modes_and_features(dtype):
    """The product's modes x features once more with the default thread count (dynamic scheduling
    of the work items over several threads)."""
    assert torch.get_num_threads() >= 1
    modes_times_features(dtype, 128, 16, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_causal_and_long_decode(dtype):
    """Non-causal prefill, and decode over long contexts where the kernel splits the keys."""
    run_and_compare(make_case([4, 9], [30, 9], causal=False, dtype=dtype, seed=1), "non-causal")
    run_and_compare(make_case([4, 9], [30, 9], causal=False, window=5, dtype=dtype, seed=2), "non-causal window")
    run_and_compare(make_case([1], [3000], num_heads=8, num_kv_heads=1, block_size=16, dtype=dtype, seed=3), "B=1 long")
    run_and_compare(make_case([1, 1], [2048, 5], num_heads=4, num_kv_heads=4, block_size=32, window=300,
                              softcap=10.0, sink=True, dtype=dtype, seed=4), "long window")


def test_long_prefill_tiles():
    """Prefill longer than any query/key tile, with a cached prefix."""
    run_and_compare(make_case([130, 70], [300, 70], num_heads=6, num_kv_heads=2, head_dim=80, block_size=8, seed=5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_cache_write(dtype, block_size):
    g = torch.Generator().manual_seed(block_size)
    hkv, d, t = 3, 80, 40
    num_blocks = -(-2 * t // block_size)  # room for every token, half the slots stay NaN
    k_cache = torch.full((num_blocks, block_size, hkv, d), math.nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    packed = torch.randn(t, 2 * hkv + 4, d, generator=g).to(dtype)  # k, v as strided slices
    k, v = packed[:, :hkv], packed[:, hkv:2 * hkv]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[::5] = -1  # padding tokens
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.cache_write(k, v, ref_k, ref_v, slots)
    kvmem.cache_write(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, ref_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, ref_v, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_states(dtype):
    g = torch.Generator().manual_seed(7)
    t, h, d = 9, 5, 96
    out_a, out_b = (torch.randn(t, h, d, generator=g).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(t, h, generator=g) * 4 for _ in range(2))
    lse_a[0], lse_b[1] = -math.inf, -math.inf  # empty partials...
    out_a[0] = math.nan  # ...whose out is garbage
    out_b[1] = math.nan
    lse_a[2], lse_b[2] = -math.inf, -math.inf
    out, lse = kvmem.merge_states(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = reference.merge_states(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any()
    assert_close(out, ref)
    assert_close(lse, ref_lse, what="lse")
