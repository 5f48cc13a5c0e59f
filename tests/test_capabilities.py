"""Capabilities as data: a call that uses an optional argument a backend has not declared
rejects that backend with a reason, and a kernel is never handed an argument it would drop.

For every optional argument of every op: each backend whose capability record does not declare
it is rejected (the record's verdict on a call on that backend's own device, and through
explain() where the backend can run here), its implementation refuses such a parameter object
outright, and the reference backend, which declares every argument, runs it.
"""

import dataclasses
import importlib
import math

import pytest
import torch

import kvmem
from cases import make_case
from memory_cases import make_memory_case
from kvmem import _ext, dispatch
from kvmem.ops import OP_NAMES

PARAMS = {op: importlib.import_module(f"kvmem.ops.{op}.params") for op in OP_NAMES}
BACKEND_DEVICE = {"cuda": "cuda", "triton": "cuda", "cpu": "cpu", "reference": "cpu"}


def _rope(num_positions, rot_dim):
    inv = 1.0 / 10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


def _paged_attention(arg):
    """(public kwargs using ``arg``, the case): a CPU call whose only optional argument is ``arg``."""
    case = make_case([2, 1], [9, 20], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, seed=3)
    case.k_cache.nan_to_num_(0.0)
    case.v_cache.nan_to_num_(0.0)
    scales = dict(k_scale=torch.tensor(0.5), v_scale=torch.tensor(2.0))
    given = {"window": dict(window=4), "softcap": dict(softcap=5.0), "sink_logits": dict(sink_logits=torch.randn(4)),
             "k_scale": scales, "v_scale": scales, "rope_cos_sin": dict(rope_cos_sin=_rope(case.max_seqlen_k, 64)),
             "rope_neox": dict(rope_cos_sin=_rope(case.max_seqlen_k, 64), rope_neox=False)}[arg]
    return given, case


def _cache_write(arg):
    del arg
    return dict(k_scale=torch.tensor(0.5), v_scale=torch.tensor(2.0)), None


def _optional_args(op):
    mod = PARAMS[op]
    return sorted(set(mod.FEATURE_OF) | set(mod.MODIFIER_OF))


def _feature(op, arg):
    mod = PARAMS[op]
    return mod.FEATURE_OF[arg] if arg in mod.FEATURE_OF else mod.FEATURE_OF[mod.MODIFIER_OF[arg]]


OPTIONAL = [(op, arg) for op in OP_NAMES for arg in _optional_args(op)]


def test_every_optional_argument_is_a_feature_or_common():
    """A new optional field of a parameter object must be declared as a feature (or a modifier of
    one, or common to every backend): otherwise it could reach a kernel that ignores it."""
    for op in OP_NAMES:
        mod = PARAMS[op]
        cls = next(v for k, v in vars(mod).items() if k.endswith("Params") and dataclasses.is_dataclass(v))
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        known = set(mod.FEATURE_OF) | set(mod.MODIFIER_OF) | set(mod.COMMON)
        assert optional <= known, (op, optional - known)


# (op, backend) pairs without a record (the op's capabilities.py says why); adding one is deliberate.
NO_RECORD = {("memory_select", "cuda")}


def test_every_op_has_a_record_per_backend():
    for op in OP_NAMES:
        for backend in dispatch.BY_NAME:
            assert (dispatch.capability(op, backend) is not None) == ((op, backend) not in NO_RECORD), (op, backend)
        # the reference declares every optional argument
        assert set(dispatch.capability(op, "reference").features) == set(PARAMS[op].FEATURE_OF.values()), op


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_memory_attention_records_are_the_paged_records(backend):
    """The composite (compacted tables + paged_attention on that backend) declares what that
    backend's paged_attention declares, the features both ops have, and never block_mass."""
    paged, memory = dispatch.capability("paged_attention", backend), dispatch.capability("memory_attention", backend)
    for name in ("devices", "dtypes", "cache_dtypes", "head_dims", "max_head_dim", "max_block_size", "max_seqlen_q",
                 "needs_aligned", "from_build"):
        assert getattr(memory, name) == getattr(paged, name), name
    assert memory.kernels_of == "paged_attention"
    assert memory.features == paged.features & (set(PARAMS["memory_attention"].FEATURE_OF.values()) - {"block_mass"})
    seen, built = dispatch.BY_NAME[backend].capability("paged_attention"), dispatch.BY_NAME[backend].capability(
        "memory_attention")  # with the build's facts (compiled backends)
    assert (built.dtypes, built.head_dims, built.max_head_dim) == (seen.dtypes, seen.head_dims, seen.max_head_dim)


def _call(op, arg, device_type):
    """A Call of ``op`` on ``device_type`` using only the optional argument ``arg`` (fp16, d=128,
    page 16: what every backend's kernels take)."""
    feature = _feature(op, arg)
    return dispatch.Call(op, device_type, torch.float16, 128, 16 if op != "merge_states" else 0, 8, 2,
                         torch.float16 if op != "merge_states" else None, frozenset({feature}))


@pytest.mark.parametrize("op,arg", OPTIONAL)
@pytest.mark.parametrize("backend", list(dispatch.BY_NAME))
def test_undeclared_argument_rejects_the_backend(op, arg, backend):
    cap = dispatch.capability(op, backend)
    call = _call(op, arg, BACKEND_DEVICE[backend])
    if cap is None:  # no record (NO_RECORD): the backend rejects every call of the op
        assert dispatch.BY_NAME[backend].rejects(call)[0] == "inapplicable"
        return
    assert dataclasses.replace(call, features=frozenset()).op == op
    assert cap.rejects(dataclasses.replace(call, features=frozenset())) is None, (op, backend)
    feature = _feature(op, arg)
    why = cap.rejects(call)
    if feature in cap.features:
        assert why is None
        return
    assert why is not None and why[0] == "fallback" and feature in why[1], why


@pytest.mark.parametrize("op,arg", [x for x in OPTIONAL if x[0] == "paged_attention"])
def test_undeclared_argument_never_reaches_a_kernel(op, arg):
    """The second lock: an implementation refuses a parameter object using an argument it lacks
    (before any kernel is looked up), so no call can run with the argument dropped."""
    from kvmem.ops.paged_attention.params import PagedAttentionParams

    given, case = _paged_attention(arg)
    params = PagedAttentionParams.build(*case.args(), **given)
    for backend in dispatch.BY_NAME:
        cap = dispatch.capability(op, backend)
        if _feature(op, arg) in cap.features:
            continue
        with pytest.raises(RuntimeError, match="does not take it"):
            cap.run(params)


def test_undeclared_cache_write_scale_never_reaches_a_kernel():
    from kvmem.ops.cache_write.params import CacheWriteParams

    k_cache = torch.zeros(4, 8, 2, 64)
    params = CacheWriteParams(torch.randn(3, 2, 64), torch.randn(3, 2, 64), k_cache, k_cache.clone(),
                              torch.tensor([0, 5, 9]), torch.tensor(0.5), torch.tensor(2.0))
    for backend in ("cuda", "triton", "cpu"):
        cap = dispatch.capability("cache_write", backend)
        if "kv_scale" in cap.features:  # this backend takes scales (its tests check them)
            continue
        with pytest.raises(RuntimeError, match="does not take it"):
            cap.run(params)


@pytest.fixture
def _auto(monkeypatch):
    monkeypatch.delenv("KVMEM_BACKEND", raising=False)
    dispatch._select.cache_clear()
    yield
    dispatch._select.cache_clear()


@pytest.mark.parametrize("arg", _optional_args("paged_attention"))
def test_paged_attention_argument_end_to_end(arg, _auto):
    """On CPU: explain() rejects each backend lacking the argument, naming the feature; the call
    runs on a backend that declares it and matches the reference."""
    given, case = _paged_attention(arg)
    feature = _feature("paged_attention", arg)
    call = dispatch.Call.paged_attention(case.q, case.k_cache, case.v_cache, case.max_seqlen_q,
                                         given.get("window"), given.get("softcap"), given.get("sink_logits"),
                                         given.get("k_scale"), given.get("rope_cos_sin"))
    assert feature in call.features
    from kvmem.ops.paged_attention.params import PagedAttentionParams

    assert PagedAttentionParams.build(*case.args(), **given).call() == call  # one description of a call
    why = dispatch.explain(call)
    cpu_declares = feature in dispatch.capability("paged_attention", "cpu").features
    if _ext.has_kernel("paged_attention", "cpu"):
        if cpu_declares:
            assert why["cpu"] == "selected", why
        else:
            assert why["cpu"].startswith("rejected: feature") and feature in why["cpu"], why
            assert why["reference"] == "selected", why
    out = kvmem.paged_attention(*case.args(), **given)
    exp, _ = kvmem.ops.reference.paged_attention(*case.args(), scale=1 / math.sqrt(64), **given)
    torch.testing.assert_close(out, exp, atol=2e-5, rtol=2e-5)


def test_cache_write_scales_end_to_end(_auto):
    given, _ = _cache_write("k_scale")
    call = dispatch.Call.cache_write(torch.randn(3, 2, 64), torch.zeros(4, 8, 2, 64), given["k_scale"])
    assert call.features == {"kv_scale"}
    from kvmem.ops.cache_write.params import CacheWriteParams

    k_cache = torch.zeros(4, 8, 2, 64)
    assert CacheWriteParams(torch.randn(3, 2, 64), torch.randn(3, 2, 64), k_cache, k_cache, torch.tensor([0, 1, 2]),
                            **given).call() == dispatch.Call.cache_write(torch.randn(3, 2, 64), k_cache, **given)
    why = dispatch.explain(call)
    if _ext.has_kernel("cache_write", "cpu"):  # the C++ CPU kernel takes scales (kvmem's one encoding)
        assert why["cpu"] == "selected", why
    else:
        assert why["reference"] == "selected", why
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    kc, vc = torch.zeros(4, 8, 2, 64), torch.zeros(4, 8, 2, 64)
    kvmem.cache_write(k, v, kc, vc, torch.tensor([0, 5, 9]), **given)
    torch.testing.assert_close(kc[0, 0], k[0] / 0.5)
    torch.testing.assert_close(vc[1, 1], v[2] / 2.0)


def _memory_attention(arg):
    """(params, public kwargs, case): a CPU memory_attention call whose only optional argument is ``arg``."""
    build = {"softcap": dict(softcap=5.0), "sink_logits": dict(sink_logits=True), "k_scale": dict(kv_scale=True),
             "v_scale": dict(kv_scale=True), "rope_cos_sin": dict(rope_rot_dim=64),
             "rope_neox": dict(rope_rot_dim=64)}.get(arg, {})
    case = make_memory_case([1, 3], [70, 90], num_heads=4, num_kv_heads=2, top_k=2, extra_bank=1, seed=1, **build)
    kw = case.memory_kwargs()
    if arg == "rope_neox":
        kw["rope_neox"] = False
    if arg == "block_mass":
        kw["block_mass"] = torch.zeros(case.bank_table.shape[0], 2, case.bank_table.shape[1])
    return kw, case


@pytest.mark.parametrize("arg", _optional_args("memory_attention"))
def test_undeclared_memory_attention_argument_never_reaches_a_kernel(arg):
    from kvmem.ops.memory_attention.params import MemoryAttentionParams

    kw, case = _memory_attention(arg)
    params = MemoryAttentionParams.build(*case.args(), **kw)
    assert _feature("memory_attention", arg) in params.features
    for backend in dispatch.BY_NAME:
        cap = dispatch.capability("memory_attention", backend)
        if _feature("memory_attention", arg) in cap.features:
            continue
        with pytest.raises(RuntimeError, match="does not take it"):
            cap.run(params)


@pytest.mark.parametrize("arg", _optional_args("memory_attention"))
def test_memory_attention_argument_end_to_end(arg, _auto):
    """On CPU: the composite cpu backend runs the calls whose arguments its paged kernels take and
    is rejected, naming the feature, for the others (the reference runs them); same results."""
    from kvmem.ops.memory_attention import memory_attention
    from kvmem.ops.memory_attention.params import MemoryAttentionParams

    kw, case = _memory_attention(arg)
    feature = _feature("memory_attention", arg)
    call = MemoryAttentionParams.build(*case.args(), **kw).call()
    assert feature in call.features
    why = dispatch.explain(call)
    if _ext.has_kernel("paged_attention", "cpu"):
        if feature in dispatch.capability("memory_attention", "cpu").features:
            assert why["cpu"] == "selected", why
        else:
            assert why["cpu"].startswith("rejected: feature") and feature in why["cpu"], why
            assert why["reference"] == "selected", why
    want_mass = None if "block_mass" not in kw else torch.zeros_like(kw["block_mass"])
    out, lse = memory_attention(*case.args(), **kw, return_lse=True)
    ref_kw = dict(kw, block_mass=want_mass) if want_mass is not None else kw
    want, want_lse = kvmem.ops.reference.memory_attention(*case.args(), **ref_kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    if want_mass is not None:
        torch.testing.assert_close(kw["block_mass"], want_mass)


def test_memory_select_query_index_end_to_end(_auto):
    from kvmem.ops.memory_select import memory_select

    q = torch.randn(5, 4, 64)
    summaries = torch.randn(6, 2, 2, 64)
    bank_table = torch.tensor([[0, 3, 5], [1, 2, -1]], dtype=torch.int32)
    bank_lens = torch.tensor([3, 2], dtype=torch.int32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    index = torch.tensor([1, 4], dtype=torch.int32)
    call = dispatch.Call.memory_select(q, summaries, index)
    assert call.features == {"query_index"}
    why = dispatch.explain(call)
    chosen = "cpu" if _ext.has_kernel("memory_select", "cpu") else "reference"  # the C++ kernel takes query_index
    assert why[chosen] == "selected" and why["cuda"].startswith("rejected")
    got = memory_select(q, summaries, bank_table, bank_lens, cu, 2, query_index=index)
    assert torch.equal(got, kvmem.ops.reference.memory_select(q, summaries, bank_table, bank_lens, cu, 2,
                                                               query_index=index))
