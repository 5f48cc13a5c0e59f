"""paged_attention on a real GPU, every GPU backend (``cuda``, compiled ``triton``) vs the
reference (tests marked ``gpu``), plus CPU checks of what those tests rely on.

With ``KVMEM_VERIFY_OUT=path.json`` the CUDA configurations that passed (these tests' and
test_cache_write.py's ``test_cache_write_and_merge_gpu``) are written there in exactly the format
of kvmem/verified/cuda.json (one record, for this GPU's arch), and the Triton ones beside it as
``<path>_triton.json`` (information only: Triton needs no record): tests/ops/conftest.py.
benchmarks/gpu_check.sh does this; ``python tools/merge_verified.py path.json`` merges the CUDA
record into kvmem/verified/cuda.json.

What one passing ``paged_attention`` entry (backend x dtype x head dim x page size) covers: GQA
groups 1, 3, 4, 7, 8, 12, 16 (the CUDA kernel's head-chunk path for groups > 8 included; the
entry records ``max_group`` = 16 and the dispatcher does not use it for larger groups), decode,
speculative multi-token steps (q_len 2..8), mixed batches, and for Triton prefill (with and
without a cached prefix), each with window / softcap / sink features rotated over the cases,
strided (interleaved K/V pool, q sliced from qkv) and contiguous layouts, and a long decode with
many splits.
"""

import math
import os

import pytest
import torch

import kvmem
from backends import PASSED, on
from cases import FEATURES, MODES, make_case, to_device
from kvmem import _ext
from kvmem.ops.paged_attention.capabilities import CUDA_MAX_SEQLEN_Q
from tolerances import assert_close

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_DIMS = [64, 80, 96, 112, 128, 256]
BLOCK_SIZES = [1, 8, 16, 32, 64, 128, 256]
GROUPS = (1, 3, 4, 7, 8, 12, 16)  # 12 and 16: the CUDA kernel's chunks of 8 query heads
# speculative decoding: several query tokens per sequence through the decode kernels
GPU_MODES = {**MODES, "spec": ([2, 5, 8, 3], [9, 40, 8, 70])}


def _supported(backend, dtype):
    """Whether ``backend`` has a paged_attention kernel for ``dtype`` (CUDA: as the build reports)."""
    if backend != "cuda":
        return True
    facts = _ext.kernel_facts("paged_attention", "cuda")
    return facts is None or str(dtype).replace("torch.", "") in facts["dtypes"]  # None: fail loudly below


def _check(case, backend):
    out = torch.full_like(case.q, math.nan)
    got, lse = kvmem.paged_attention(*case.args(), **case.kwargs, out=out, return_lse=True)
    ref, ref_lse = case.reference()
    assert_close(got, ref, what=f"out ({backend}: {case.describe()})")
    assert_close(lse, ref_lse, what="lse")


@pytest.mark.gpu
def test_triton_kernels_are_compiled():
    """On the GPU the Triton kernels must be real JIT functions, not the interpreter's (a
    TRITON_INTERPRET=1 left over from a CPU test module would make every launch interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    cw, configs, ms, pa = _triton_modules()
    assert not configs.interpreting(), f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} on a GPU run"
    for fn in (pa._prefill_kernel, pa._decode_kernel, pa._decode_reduce_kernel, ms._merge_states_kernel,
               cw._cache_write_kernel):
        assert isinstance(fn, JITFunction) and not isinstance(fn, InterpretedFunction), fn


def _triton_modules():
    """(cache_write, shared Triton facts, merge_states, paged_attention) Triton modules: each op
    folder's ``triton`` (kvmem.ops.<op> is the public function, so import the modules by path)
    and ``kvmem.ops.triton_aot`` (interpreting(), every op's aot_variants(), DTYPE_NAMES)."""
    import importlib

    return tuple(importlib.import_module(m) for m in (
        "kvmem.ops.cache_write.triton", "kvmem.ops.triton_aot", "kvmem.ops.merge_states.triton",
        "kvmem.ops.paged_attention.triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@on("cuda", "triton")
def test_paged_attention_gpu(backend, dtype_name, head_dim, block_size):
    dtype = DTYPES[dtype_name]
    if not _supported(backend, dtype):
        pytest.skip(f"{backend} has no {dtype_name} paged_attention")
    features = list(FEATURES)
    seed = 0
    for gi, group in enumerate(GROUPS):
        hkv = 2 if group < 7 else 1
        for mi, (mode, (q_lens, kv_lens)) in enumerate(GPU_MODES.items()):
            if backend == "cuda" and max(q_lens) > CUDA_MAX_SEQLEN_Q:
                continue  # prefill is not the CUDA decode kernel's job
            seed += 1
            feature = features[(gi + mi + head_dim + block_size) % len(features)]  # rotated
            case = make_case(q_lens, kv_lens, num_heads=group * hkv, num_kv_heads=hkv, head_dim=head_dim,
                             block_size=block_size, dtype=dtype, strided=seed % 2 == 0, seed=seed,
                             device="cuda", **FEATURES[feature])
            _check(case, backend)
    # long steps: many splits (the group > 8 chunk path too), and a long speculative step
    for q_lens, kv_lens, hq, hkv, feats in (([1, 1, 1], [4000, 17, 1500], 8, 2, dict(sink=True)),
                                            ([1, 1], [3000, 700], 24, 2, dict(window=1000, softcap=20.0)),
                                            ([4, 1], [2500, 33], 32, 8, dict(sink=True))):
        case = make_case(q_lens, kv_lens, num_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                         block_size=block_size, dtype=dtype, seed=99, device="cuda", strided=hq == 24, **feats)
        _check(case, backend)
    PASSED.setdefault(backend, []).append({"op": "paged_attention", "dtype": dtype_name, "head_dim": head_dim,
                                           "block_size": block_size, "max_group": max(GROUPS)})


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits_hint", ["short", "long"])
@on("cuda", "triton")
def test_padding_tokens_untouched_gpu(backend, num_splits_hint):
    """Rows of q past cu_seqlens_q[-1] (a CUDA graph captured for more tokens; only possible
    with check=False) belong to no sequence: not written, and no out-of-bounds reads."""
    kv_lens = [9, 33] if num_splits_hint == "short" else [3000, 1200]
    case = make_case([1, 2], kv_lens, num_heads=24, num_kv_heads=2, head_dim=128, block_size=16,
                     dtype=torch.bfloat16, seed=5, device="cuda", sink=True)
    pad = 5
    q = torch.cat([case.q, torch.randn(pad, *case.q.shape[1:], device="cuda", dtype=case.q.dtype)])
    out = torch.full_like(q, 7.0)
    args = list(case.args())
    args[0] = q
    kvmem.paged_attention(*args, **case.kwargs, out=out, check=False)
    ref, _ = case.reference()
    assert_close(out[:-pad], ref)
    assert bool((out[-pad:] == 7.0).all()), "padding rows were written"


# ---------------------------------------------------------------------------------------------
# CPU checks of what the GPU tests rely on
# ---------------------------------------------------------------------------------------------


def test_cases_keep_strides_on_device():
    """``strided=True`` cases stay strided on the device (``t.to(device)`` would densify them)."""
    case = make_case([1, 3], [20, 9], num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, strided=True, seed=3)
    for device in ("meta", "cpu"):
        moved = to_device(case, device)
        for a, b in zip(case.args(), moved.args()):
            if isinstance(a, torch.Tensor):
                assert b.device.type == device
                assert (b.shape, b.stride(), b.storage_offset()) == (a.shape, a.stride(), a.storage_offset())
                if device == "cpu":
                    torch.testing.assert_close(a, b, equal_nan=True, atol=0, rtol=0)
    assert not to_device(case, "meta").k_cache.is_contiguous()
    assert not to_device(case, "meta").q.is_contiguous()


def _aot_tool():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "tools", "aot_compile_triton.py")
    spec = importlib.util.spec_from_file_location("aot_compile_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@on("triton")
def test_aot_variants_match_jit_specialization(backend, monkeypatch):
    """Launches through the public ops (interpreter, CPU) specialise exactly like the variant
    tools/aot_compile_triton.py compiles: same int constants (an argument equal to 1 would be
    one unless in do_not_specialize), same /16 hints, and the variant is in the enumeration.
    Covers contiguous lse (stride 1), no lse, one-column block tables, split and unsplit decode,
    speculative steps, merge with contiguous lse, cache_write, and float8 caches (attention and
    cache_write)."""
    pytest.importorskip("triton")
    cw, configs, ms, pa = _triton_modules()
    import importlib

    msel = importlib.import_module("kvmem.ops.memory_select.triton")
    aot = _aot_tool()  # the backend fixture skips unless the launchers run under TRITON_INTERPRET=1 (CPU)
    records = []

    class Recorder:
        def __init__(self, kernel, fn):
            self.kernel, self.fn = kernel, fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                records.append((self.kernel, self.fn, args, kwargs))
                return self.fn[grid](*args, **kwargs)
            return run

    for mod, attr, kernel in ((pa, "_prefill_kernel", "prefill"), (pa, "_decode_kernel", "decode"),
                              (pa, "_decode_reduce_kernel", "decode_reduce"),
                              (ms, "_merge_states_kernel", "merge_states"), (cw, "_cache_write_kernel", "cache_write"),
                              (msel, "_block_scores_kernel", "memory_select_scores")):
        monkeypatch.setattr(mod, attr, Recorder(kernel, getattr(mod, attr)))
    for dtype, q_lens, kv_lens, bs, hq, feats in (
            (torch.float16, [1], [5], 16, 4, {}),  # one-column block table, unsplit decode
            (torch.float16, [1, 1], [700, 40], 8, 4, dict(sink=True)),  # split decode + reduce
            (torch.float32, [3, 2], [40, 9], 8, 8, dict(softcap=5.0)),  # speculative step, fp32
            (torch.bfloat16, [70, 5], [80, 5], 16, 2, dict(window=20))):  # prefill
        case = make_case(q_lens, kv_lens, num_heads=hq, num_kv_heads=1, head_dim=64, block_size=bs, dtype=dtype,
                         seed=len(records), **feats)
        kvmem.paged_attention(*case.args(), **case.kwargs, return_lse=True)
        kvmem.paged_attention(*case.args(), **case.kwargs)
    for q_lens, kv_lens, neox in (([1], [40], True), ([20], [20], False)):  # RoPE on load: decode, prefill
        case = make_case(q_lens, kv_lens, num_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
                         dtype=torch.float16, seed=len(records))
        cos_sin = torch.randn(case.max_seqlen_k, 32)
        kvmem.paged_attention(*case.args(), **case.kwargs, rope_cos_sin=cos_sin, rope_neox=neox)
    for q_lens, kv_lens, fmt, hd in (([1], [40], torch.float8_e4m3fn, 64), ([70], [70], torch.float8_e4m3fn, 64),
                                     ([1], [30], torch.float8_e5m2, 128)):
        case = make_case(q_lens, kv_lens, num_heads=4, num_kv_heads=2, head_dim=hd, block_size=16,
                         dtype=torch.bfloat16, seed=len(records))  # float8 caches: decode, prefill
        scales = dict(k_scale=torch.tensor(0.5), v_scale=torch.rand(2) + 0.5)
        f8 = [c.float().nan_to_num(0.0).to(fmt) for c in (case.k_cache, case.v_cache)]
        kvmem.paged_attention(case.q, f8[0], f8[1], *case.args()[3:], **case.kwargs, **scales)
        kv8 = torch.zeros(3, 16, 2, hd, dtype=fmt)
        kvmem.cache_write(torch.randn(4, 2, hd, dtype=torch.bfloat16), torch.randn(4, 2, hd, dtype=torch.bfloat16), kv8,
                          kv8.clone(), torch.tensor([0, 5, -1, 40]), **scales)
    o = torch.randn(3, 5, 64, dtype=torch.float16)
    lse = torch.randn(3, 5)
    kvmem.merge_states(o, lse, o, lse)
    kv = torch.randn(4, 2, 64, dtype=torch.float16)
    cache = torch.zeros(3, 16, 1, 64, dtype=torch.float16)
    kvmem.cache_write(kv[:, :1], kv[:, 1:], cache, cache.clone(), torch.tensor([0, 5, -1, 40]))
    from kvmem.ops.memory_select import memory_select

    for summary, qdt in (("minmax", torch.bfloat16), ("box", torch.float32), ("reps", torch.float16), ("mean", torch.bfloat16)):  # memory_select's block scores
        memory_select(torch.randn(3, 4, 64, dtype=qdt), torch.randn(5, 2, 2, 64),
                      torch.tensor([[0, 3, 1], [4, 2, 0]], dtype=torch.int32), torch.tensor([3, 1], dtype=torch.int32),
                      torch.tensor([0, 1, 3], dtype=torch.int32), 2, summary=summary)

    assert {k for k, _, _, kw in records if kw.get("FORMAT")} == {"prefill", "decode", "cache_write"}  # float8 ran
    names = {v.name for v in configs.aot_variants(80)}
    seen = set()
    for kernel, fn, args, kwargs in records:
        constexprs = {n: kwargs[n] for n in fn.arg_names if n in kwargs}
        assert len(args) + len(constexprs) == len(fn.arg_names), f"{kernel}: constexprs by keyword, the rest by position"
        # element type of: the cache (cache_write, k is the source), out (decode_reduce), q (memory_select_scores),
        # q / out (the others)
        where = {"cache_write": 2, "decode_reduce": 4, "memory_select_scores": 1}.get(kernel, 0)
        fp8 = configs.FORMAT_NAMES.get(constexprs.get("FORMAT"))  # a float8 cache (uint8 storage): its format
        dtype = fp8 if fp8 and kernel == "cache_write" else configs.DTYPE_NAMES[args[where].dtype]
        src = configs.DTYPE_NAMES[args[0].dtype] if kernel == "cache_write" else None
        cache = None
        if kernel in ("prefill", "decode") and (fp8 or args[1].dtype != args[0].dtype):
            cache = fp8 or configs.DTYPE_NAMES[args[1].dtype]
        variant = configs.AotVariant(kernel, dtype, tuple(constexprs.items()), kwargs.get("num_warps", 4),
                                     kwargs.get("num_stages", 3), src, cache)
        assert variant.name in names, f"launched variant not in the AOT enumeration: {variant.name}"
        sig, attrs = aot.signature_and_attrs(kernel, fn, constexprs, dtype, src, cache)
        jit_sig, jit_div = aot.jit_specialization(fn, args)
        for i, name in enumerate(fn.arg_names[:len(args)]):
            assert jit_sig[name] == sig[name], f"{variant.name}: {name}={args[i]!r}: JIT {jit_sig[name]}, AOT {sig[name]}"
            assert (i in jit_div) == ((i,) in attrs), \
                f"{variant.name}: {name}={args[i]!r}: /16 hint JIT {i in jit_div}, AOT {(i,) in attrs}"
        seen.add(kernel)
    assert seen == {"prefill", "decode", "decode_reduce", "merge_states", "cache_write", "memory_select_scores"}
