"""RoPE on load (``paged_attention(..., rope_cos_sin, rope_neox)``) on every backend that declares
the "rope" feature, against the reference (whose RoPE tests/test_quant_rope.py checks against an
independent formulation) and against rotating the keys before caching.

Cases (pairwise over the axes, not their product): NaN in unused slots and shuffled pages
(tests/cases.py), GQA groups 1/3/4/8, head dims 64/80/128, full and partial rotary, NeoX halves
and GPT-J pairs, fp32/bf16/fp16, decode, prefill with a cached prefix and mixed batches (with
window, softcap and sink). Triton runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py).
"""

import importlib
import math

import pytest
import torch

import kvmem
from kvmem import _ext, backends
from kvmem.dispatch import capability
from kvmem.ops import reference
from kvmem.ops.paged_attention.params import PagedAttentionParams

from cases import MODES, make_case
from test_quant_rope import rope_table, rotate_dense
from tolerances import LSE, OUT, TRITON_LSE, TRITON_OUT

OP = "paged_attention"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _runnable(backend):
    """Why ``backend`` cannot run here (None: it can)."""
    if backend == "cpu":
        return None if _ext.has_kernel(OP, "cpu") else "kvmem._C not built"
    if backend == "triton":
        try:
            importlib.import_module("kvmem.ops.paged_attention.triton")
        except ImportError as e:
            return f"no triton: {e}"
        from kvmem.ops._triton import interpreting
        return None if interpreting() or torch.cuda.is_available() else "needs TRITON_INTERPRET=1 or a GPU"
    if backend == "cuda":
        return None if torch.cuda.is_available() and _ext.has_kernel(OP, "cuda") else "needs CUDA"
    return "unknown backend"


ROPE_BACKENDS = [b for b in ("cpu", "triton", "cuda") if "rope" in capability(OP, b).features]


@pytest.fixture(autouse=True)
def _skip_unrunnable(request):
    """Skip a backend that cannot run here before any case is moved to its device."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend is not None and _runnable(backend) is not None:
        pytest.skip(_runnable(backend))


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def run_backend(backend, case, **kw):
    """``(out, lse)`` of ``backend``'s implementation (its capability's run), outputs poisoned."""
    why = _runnable(backend)
    if why is not None:
        pytest.skip(why)
    p = PagedAttentionParams.build(*case.args(), **case.kwargs, **kw, return_lse=True)
    p.out.fill_(math.nan)
    p.lse.fill_(math.nan)
    capability(OP, backend).run(p)
    return p.out, p.lse


def check(backend, out, lse, exp, exp_lse, what=""):
    tol = (TRITON_OUT if backend == "triton" else OUT)[exp.dtype]
    assert not torch.isnan(out).any(), f"{what}: NaN in out"
    torch.testing.assert_close(out.cpu(), exp.cpu(), **tol, msg=lambda m: f"{what} out: {m}")
    torch.testing.assert_close(lse.cpu(), exp_lse.cpu(), **(TRITON_LSE if backend == "triton" else LSE),
                               msg=lambda m: f"{what} lse: {m}")


# (mode, group, head_dim, rot_dim, neox, dtype, block_size, features)
CASES = [
    ("decode", 1, 64, 64, True, F32, 16, {}),
    ("decode", 3, 80, 32, False, BF16, 8, {}),
    ("decode", 4, 128, 64, True, F16, 1, {}),
    ("decode", 8, 128, 128, False, F32, 32, {}),
    ("prefill_cached_prefix", 1, 128, 128, False, BF16, 16, {}),
    ("prefill_cached_prefix", 3, 64, 64, True, F16, 8, {}),
    ("prefill_cached_prefix", 4, 80, 80, False, F32, 16, {}),
    ("prefill_cached_prefix", 8, 64, 16, True, BF16, 16, {}),
    ("mixed", 4, 128, 96, True, F32, 8, dict(window=12, softcap=5.0, sink=True)),
    ("mixed", 3, 80, 48, False, F16, 16, dict(window=9)),
]


def _id(c):
    mode, g, d, rot, neox, dtype, bs, feats = c
    return (f"{mode}-g{g}-d{d}-rot{rot}-{'neox' if neox else 'gptj'}-{str(dtype)[6:]}-bs{bs}"
            + "".join(f"-{k}" for k in feats))


def case_of(mode, group, head_dim, dtype, block_size, feats, seed):
    q_lens, kv_lens = MODES[mode]
    return make_case(q_lens, kv_lens, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, seed=seed, **feats)


@pytest.mark.parametrize("backend", ROPE_BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=[_id(c) for c in CASES])
def test_rope_on_load_matches_reference(backend, c):
    mode, group, head_dim, rot, neox, dtype, bs, feats = c
    case = case_of(mode, group, head_dim, dtype, bs, feats, seed=group * 7 + rot)
    dev = _device(backend)
    if dev != "cpu":
        from cases import to_device
        case = to_device(case, dev)
    cos_sin = rope_table(case.max_seqlen_k + 3, rot).to(dev)
    out, lse = run_backend(backend, case, rope_cos_sin=cos_sin, rope_neox=neox)
    exp, exp_lse = reference.paged_attention(*case.args(), **case.kwargs, rope_cos_sin=cos_sin, rope_neox=neox)
    check(backend, out, lse, exp, exp_lse, _id(c))
    if backend == "cpu":  # the rotation matters here: without it the answer differs (once is enough)
        plain, _ = run_backend(backend, case)
        assert (plain.float() - exp.float()).abs().max() > 1e-2


def _prerotated(case, cos_sin, neox):
    """Caches whose live keys are rotated at their positions before caching (cache_write)."""
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    bs = k_cache.shape[1]
    for b, kv_len in enumerate(case.seq_lens.tolist()):
        lo, _ = reference.visible_key_range(kv_len, int(case.cu_seqlens_q[b + 1] - case.cu_seqlens_q[b]),
                                            case.kwargs.get("causal", True), case.kwargs.get("window"))
        pos = torch.arange(lo, kv_len)
        blocks = case.block_table[b].long()[pos // bs]
        slots = blocks * bs + pos % bs
        k = rotate_dense(k_cache[blocks, pos % bs].float(), pos, cos_sin, neox)
        kvmem.cache_write(k.to(k_cache.dtype), v_cache[blocks, pos % bs], k_cache, v_cache, slots)
    return k_cache, v_cache


@pytest.mark.parametrize("backend", ROPE_BACKENDS)
@pytest.mark.parametrize("mode,neox,dtype,rot", [("decode", True, F32, 64), ("prefill_cached_prefix", False, BF16, 32),
                                                 ("mixed", True, F16, 128)])
def test_rope_on_load_equals_rotating_before_caching(backend, mode, neox, dtype, rot):
    if backend == "triton" and mode == "mixed":
        pytest.skip("interpreter time: decode and prefix-prefill cover the Triton kernels")
    case = case_of(mode, 4, 128, dtype, 8, {}, seed=rot)
    cos_sin = rope_table(case.max_seqlen_k, rot)
    out, lse = run_backend(backend, case, rope_cos_sin=cos_sin, rope_neox=neox)
    k_rot, v_rot = _prerotated(case, cos_sin, neox)
    pre = type(case)(case.q, k_rot, v_rot, *case.args()[3:], case.kwargs)
    exp, exp_lse = run_backend(backend, pre)
    # the pre-rotated cache holds rotated keys rounded to its dtype; RoPE on load keeps them fp32
    tol = dict((TRITON_OUT if backend == "triton" else OUT)[dtype])
    torch.testing.assert_close(out, exp, **tol)
    torch.testing.assert_close(lse, exp_lse, atol=1e-2 if dtype != F32 else 2e-4, rtol=1e-2 if dtype != F32 else 2e-4)


@pytest.mark.parametrize("backend", [b for b in ROPE_BACKENDS if b == "cpu"])
def test_forced_backend_runs_rope(backend, monkeypatch):
    """KVMEM_BACKEND=<backend> runs calls with rope there (no fallback to the reference)."""
    if _runnable(backend):
        pytest.skip(_runnable(backend))
    monkeypatch.setenv("KVMEM_BACKEND", backend)
    case = case_of("decode", 4, 64, F32, 16, {}, seed=11)
    cos_sin = rope_table(case.max_seqlen_k, 64)
    call = backends.Call.paged_attention(case.q, case.k_cache, case.v_cache, case.max_seqlen_q, rope_cos_sin=cos_sin)
    assert backends.explain(call)[backend] == "selected"
    out = kvmem.paged_attention(*case.args(), rope_cos_sin=cos_sin, rope_neox=False)
    exp, _ = reference.paged_attention(*case.args(), scale=64 ** -0.5, rope_cos_sin=cos_sin, rope_neox=False)
    torch.testing.assert_close(out, exp, **OUT[F32])
