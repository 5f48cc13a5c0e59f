"""Static (CUDA-graph / torch.compile friendly) decode steps of a patched Hugging Face model.

CPU: the decode step of a patched model compiles with ``torch.compile(fullgraph=True)`` into one
graph, matches eager decode, never recompiles, and reads nothing back to the host; ``generate()``
with ``patch(..., cuda_graph=True)`` / ``compile_decode=`` gives the unpatched model's tokens.
GPU (skipped without one): CUDA-graph capture/replay through ``generate()`` is tested in
tests/test_hf.py (``test_generate_cuda_graph_*``), which the GPU box's check script runs.
"""

import contextlib
import functools
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch._dynamo.testing  # noqa: E402

from kvmem.integrations import DecodeGraphRunner, PagedKVCache, patch, unpatch  # noqa: E402
from kvmem.integrations.hf.compat import cache_kwarg, output_cache  # noqa: E402
from test_hf import (assert_same_generation, gen, generate_patched, left_pad, memory_bound_ok, rel_err, tiny_llama,  # noqa: E402
                     tiny_qwen2_sliding)

CACHE_KW = cache_kwarg(transformers.LlamaForCausalLM)  # "cache" from transformers 5.24, "past_key_values" before

transformers.logging.set_verbosity_error()
LOGIT_RTOL = 1e-4
MODELS = {"llama": lambda: tiny_llama(), "qwen2_sliding": lambda: tiny_qwen2_sliding(window=8)}


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's values on the host raises inside the block."""
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"a static decode step read a tensor on the host (Tensor.{name})")
        return f

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def prefill(model, cache, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
    return out.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_step_compiles_fullgraph_and_matches_eager(name):
    """14 decode steps of a left-padded batch (block_size 4: several page boundaries, sliding
    blocks freed) through torch.compile(fullgraph=True): logits within 1e-4 of eager decode, one
    compiled frame (no recompiles after the first step)."""
    torch._dynamo.reset()
    m = MODELS[name]()
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (19, 10)])
    patch(m, block_size=4)
    try:
        eager_cache = PagedKVCache(m.config, block_size=4, max_cache_len=64)
        static_cache = PagedKVCache(m.config, block_size=4, max_cache_len=64)
        tok = prefill(m, eager_cache, ids, mask)
        assert torch.equal(prefill(m, static_cache, ids, mask), tok)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        runner = DecodeGraphRunner(m, cuda_graph=False, compile=dict(backend=counter, fullgraph=True))
        pos = mask.sum(1, keepdim=True) - 1
        kw = {cache_kwarg(m): eager_cache}
        for step in range(14):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            pos = pos + 1
            with torch.no_grad():
                ref = m(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True, **kw).logits
                out = runner.decode_step(tok, static_cache, attention_mask=mask, position_ids=pos)
            assert rel_err(out, ref) <= LOGIT_RTOL, step
            tok = ref[:, -1:].argmax(-1)
    finally:
        unpatch(m)
        torch._dynamo.reset()
    assert counter.frame_count == 1, counter.frame_count
    assert runner.stats["compiled"] == 14
    assert static_cache.row_lengths() == eager_cache.row_lengths() == [19 + 14, 10 + 14]
    assert static_cache.get_seq_length() == eager_cache.get_seq_length() == 19 + 14
    assert memory_bound_ok(static_cache)


@pytest.mark.parametrize("option", ["cuda_graph", "compile_decode"])
def test_generate_with_static_decode_matches_unpatched(option):
    """generate() through the runner (on CPU cuda_graph=True runs the static step eagerly) gives
    the unpatched tokens and logits; a second generate() (a new cache) compiles nothing, and with
    cuda_graph its cache lives in the same kept pool with the same static buffers (what the
    captured graphs point at), the first call's cache being released."""
    torch._dynamo.reset()
    m = tiny_qwen2_sliding(window=8)
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (21, 6)])
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=18, min_new_tokens=18)
    ref = gen(m, **g)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    kw = dict(cuda_graph=True) if option == "cuda_graph" else dict(compile_decode=dict(backend=counter))
    (out, out2), stats = generate_patched(m, g, g, block_size=4, **kw)
    assert "forward" not in m.__dict__ and not hasattr(m, "_kvmem_runner")
    assert_same_generation(out, ref)
    assert_same_generation(out2, ref)
    assert isinstance(output_cache(out), PagedKVCache)
    if option == "cuda_graph":
        c1, c2 = output_cache(out), output_cache(out2)
        assert c1._released and c1._pool is c2._pool and c1._static is c2._static is not None
        assert memory_bound_ok(c2)
    key = "eager_static" if option == "cuda_graph" else "compiled"
    assert stats[key] == 2 * 17  # every decode step (the first token comes from the prefill)
    if option == "compile_decode":
        assert counter.frame_count == 1


def test_static_decode_with_beam_search_and_prompt_lookup():
    """Beam search (rows reordered between static steps, copy-on-write of shared blocks) and
    prompt-lookup decoding (multi-token eager steps between static ones, crop) stay identical."""
    m = tiny_llama()
    ids = torch.randint(1, 128, (1, 17))
    beams = dict(input_ids=ids, max_new_tokens=12, min_new_tokens=12, num_beams=3, num_return_sequences=2)
    rep = torch.tensor([[5, 6, 7, 8, 9, 10, 11] * 4])
    lookup = dict(input_ids=rep, max_new_tokens=16, min_new_tokens=16, prompt_lookup_num_tokens=3)
    ref_b, ref_l = gen(m, **beams), gen(m, **lookup)
    (out_b, out_l), stats = generate_patched(m, beams, lookup, block_size=4, cuda_graph=True)
    assert torch.equal(out_b.sequences, ref_b.sequences)
    assert torch.equal(out_l.sequences, ref_l.sequences)
    assert stats["eager_static"] >= 11  # beam search's decode steps ran static


def test_static_decode_step_reads_nothing_back_to_host():
    """The whole decode step (host planning, mask check, forward) never reads a tensor's values on
    the host: on a GPU it queues work without a sync. Also true of an eager 1-token step."""
    m = tiny_qwen2_sliding(window=8)
    with no_host_reads(), pytest.raises(AssertionError, match="host"):
        torch.ones(2).sum().item()
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (20, 13)])
    patch(m, block_size=4)
    try:
        cache = PagedKVCache(m.config, block_size=4, max_cache_len=64)
        tok = prefill(m, cache, ids, mask)
        runner = DecodeGraphRunner(m, cuda_graph=True)  # CPU: the static step runs eagerly
        pos = mask.sum(1, keepdim=True) - 1
        for step in range(8):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            pos = pos + 1
            with torch.no_grad(), no_host_reads():
                if step < 6:
                    logits = runner.decode_step(tok, cache, attention_mask=mask, position_ids=pos)
                else:  # the eager path's 1-token steps
                    logits = m(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True,
                               **{cache_kwarg(m): cache}).logits
            tok = logits[:, -1:].argmax(-1)
    finally:
        unpatch(m)
    assert runner.stats["eager_static"] == 6
    assert cache.row_lengths() == [28, 21]


@pytest.mark.parametrize("static", [True, False])
def test_decode_mask_is_checked_on_device_not_dropped(static):
    """A 1-token step whose mask marks the new token as padding (or disagrees with the held
    tokens) is refused (checked on the device, no host read) and leaves the cache unchanged."""
    m = tiny_llama()
    ids = torch.randint(1, 128, (2, 9))
    patch(m, block_size=4)
    try:
        cache = PagedKVCache(m.config, block_size=4, max_cache_len=32)
        tok = prefill(m, cache, ids, torch.ones_like(ids))
        before = (cache.get_seq_length(), cache.row_lengths(), cache.manager.debug_state())
        for bad in (torch.tensor([[1] * 9 + [1], [1] * 9 + [0]]), torch.tensor([[1] * 9 + [1], [0] + [1] * 9])):
            with pytest.raises(ValueError, match="attention mask"), torch.no_grad():
                if static:
                    DecodeGraphRunner(m, cuda_graph=False).decode_step(tok, cache, attention_mask=bad)
                else:
                    m(input_ids=tok, attention_mask=bad, use_cache=True, **{cache_kwarg(m): cache})
            assert (cache.get_seq_length(), cache.row_lengths(), cache.manager.debug_state()) == before
    finally:
        unpatch(m)


def test_static_decode_step_errors():
    m = tiny_llama()
    patch(m, block_size=4)
    try:
        cache = PagedKVCache(m.config, block_size=4, max_cache_len=12)
        runner = DecodeGraphRunner(m, cuda_graph=False)
        with pytest.raises(RuntimeError, match="prefilled"):
            runner.decode_step(torch.ones(1, 1, dtype=torch.long), cache)
        tok = prefill(m, cache, torch.randint(1, 128, (1, 10)), None)
        with pytest.raises(ValueError, match="input_ids"):
            runner.decode_step(torch.ones(1, 2, dtype=torch.long), cache)
        with torch.no_grad():
            for _ in range(6):  # 10 + 6 tokens fit the buffers sized for max_cache_len=12 (+1 block)
                tok = runner.decode_step(tok, cache)[:, -1:].argmax(-1)
            with pytest.raises(ValueError, match="max_cache_len"):
                for _ in range(8):
                    tok = runner.decode_step(tok, cache)[:, -1:].argmax(-1)
        n = cache.get_seq_length()
        assert cache.row_lengths() == [n]  # the refused step changed nothing
    finally:
        unpatch(m)
    with pytest.raises(TypeError, match="cuda_graph"):
        patch(m, cuda_graph="yes")


def test_generate_with_inductor_compiled_decode():
    """compile_decode with the inductor backend (generated C++ on CPU): same tokens and logits."""
    torch._dynamo.reset()
    m = tiny_llama()
    ids, mask = left_pad([torch.randint(1, 128, (L,)).tolist() for L in (14, 9)])
    g = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10)
    ref = gen(m, **g)
    (out,), stats = generate_patched(m, g, block_size=4, compile_decode=dict(backend="inductor"))
    assert_same_generation(out, ref)
    assert stats["compiled"] == 9


def test_unpatch_restores_an_instance_forward():
    """A forward already wrapped on the instance (accelerate's hooks do this) is what the runner
    wraps, and what unpatch puts back."""
    m = tiny_llama()
    calls = []
    orig = m.forward

    @functools.wraps(orig)
    def hooked(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    m.forward = hooked
    ids = torch.randint(1, 128, (1, 9))
    ref = gen(m, input_ids=ids, max_new_tokens=5)
    n = len(calls)
    patch(m, block_size=4, cuda_graph=True)
    try:
        out = gen(m, input_ids=ids, max_new_tokens=5)
        assert m._kvmem_runner.stats["eager_static"] == 4
    finally:
        unpatch(m)
    assert m.forward is hooked
    assert len(calls) == 2 * n  # prefill and the static steps alike call the forward the runner wrapped
    assert_same_generation(out, ref)


def test_static_step_is_local_to_its_thread():
    """While one thread is inside a static decode step, another thread's patched model runs its
    ordinary (eager) steps: the static path is thread-local."""
    m, other = tiny_llama(), tiny_llama(seed=1)
    ids = torch.randint(1, 128, (1, 9))
    ref = gen(other, input_ids=ids, max_new_tokens=4)
    patch(m, block_size=4)
    patch(other, block_size=4)
    try:
        cache = PagedKVCache(m.config, block_size=4, max_cache_len=32)
        tok = prefill(m, cache, ids, None)
        res = {}
        with torch.no_grad(), cache.static_decode_step():
            t = threading.Thread(target=lambda: res.setdefault("out", gen(other, input_ids=ids, max_new_tokens=4)))
            t.start()
            t.join()
            m(input_ids=tok, position_ids=torch.full((1, 1), 9), use_cache=True, **{cache_kwarg(m): cache})
    finally:
        unpatch(m)
        unpatch(other)
    assert_same_generation(res["out"], ref)
    assert cache.row_lengths() == [10] and cache.get_seq_length() == 10
