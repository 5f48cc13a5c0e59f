"""Memory banks that outlive a call: kvmem.MemoryBank (documents, save/load, attach, combine).

* ``from_documents`` banks exactly the model's pre-RoPE keys and values of the document (checked
  against hooks on HF's own ``k_proj``/``v_proj`` over the same input, unpatched model);
* an attached bank with a covering ``top_k`` equals an independent formulation: HF's own
  attention over a ``DynamicCache`` holding the prompt's sinks, then the bank's keys rotated at
  the positions after them, then the rest of the prompt (logits within 1e-4, tokens identical);
* save -> load is bit-identical (tensors and attention); a new process gives the same greedy
  output; combined banks equal one bank holding both block sets, with a pruning ``top_k`` too;
  a ragged batch with an attached bank equals its rows alone;
* bad input: other weights / dtype / RoPE / layers, a post-RoPE bank in extend mode, truncated or
  corrupted files, a directory, an unwritable directory, an interrupted save (the earlier file
  intact): named errors, nothing changed.
* SmolLM2 (real weights): a pass key buried in a ~3k-token document bank, asked by a short
  prompt that does not contain the document, is answered.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvmem  # noqa: E402
from smollm2 import smollm2_files  # noqa: E402
from kvmem.integrations import is_patched, patch, unpatch  # noqa: E402
from kvmem.memory.bankfile import BankFileError  # noqa: E402
from test_hf_memory import LOGIT_RTOL, gen, prompt, rel_err, tiny_llama  # noqa: E402

transformers.logging.set_verbosity_error()
HERE = os.path.dirname(os.path.abspath(__file__))
S = 16  # sink tokens of the tiny configs


def cfg(**kw):
    base = dict(mode="extend", sink_tokens=S, window=128, top_k=32, chunk_size=64)
    base.update(kw)
    return kvmem.MemoryConfig(**base)


def doc(n, seed):
    return prompt(n, seed=seed)[0].tolist()


def build_bank(m, docs, config=None, **kw):
    patch(m, memory_bank=config or cfg())
    try:
        return kvmem.MemoryBank.from_documents(m, docs, progress=False, **kw)
    finally:
        unpatch(m)


def attached_generate(m, banks, config=None, **g):
    patch(m, memory_bank=config or cfg(), banks=banks)
    try:
        return gen(m, **g), m._kvmem_memory_report
    finally:
        unpatch(m)


# ------------------------------------------------------------------------------ documents
def test_document_bank_holds_the_models_pre_rope_keys_and_values():
    """Two documents (100 and 37 tokens: padded to whole blocks), window covering: the banked blocks
    are HF's own k_proj/v_proj outputs at the document's positions after the 16-token sink prefix."""
    m = tiny_llama(seed=3)
    docs = [doc(100, 5), doc(37, 6)]
    bank = build_bank(m, docs, prefix=[7, 8, 9])
    assert [d["blocks"] for d in bank.meta["documents"]] == [7, 3] and bank.num_blocks == 10
    assert [d["padding"] for d in bank.meta["documents"]] == [12, 11]
    got = {"k": [], "v": []}
    hooks = [getattr(layer.self_attn, f"{p}_proj").register_forward_hook(
        lambda mod, args, out, p=p: got[p].append(out[0].reshape(out.shape[1], 2, 16)))
        for layer in m.model.layers for p in "kv"]
    try:
        first = 0
        for d, meta in zip(docs, bank.meta["documents"]):
            ids = [7, 8, 9] + d[:S - 3] + d + [0] * meta["padding"]
            got = {"k": [], "v": []}
            with torch.inference_mode():
                m(input_ids=torch.tensor([ids]))
            n = meta["blocks"]
            for layer in bank.layers:
                want_k = got["k"][layer][S:S + 16 * n].reshape(n, 16, 2, 16)
                want_v = got["v"][layer][S:S + 16 * n].reshape(n, 16, 2, 16)
                assert rel_err(bank.keys[layer][first:first + n], want_k) < 1e-5
                assert rel_err(bank.values[layer][first:first + n], want_v) < 1e-5
            first += n
    finally:
        for h in hooks:
            h.remove()
    s = bank.summaries[0]
    assert torch.allclose(s[:, :, 0], bank.keys[0].mean(1), atol=1e-6)  # "mean" summaries


def test_attached_bank_equals_hf_attention_over_an_explicit_cache():
    """Covering top_k, the window holding the whole prompt: kvmem's output is HF's own attention
    over [prompt sinks | bank keys rotated at positions 16.. | the rest of the prompt]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny_llama(seed=4)
    bank = build_bank(m, [doc(90, 11), doc(40, 12)])
    P = prompt(45, seed=13)
    new = 6
    out, report = attached_generate(m, [bank], input_ids=P, max_new_tokens=new)
    assert sorted(report.selected_pages(0)[0]) == list(range(bank.num_blocks))  # every bank block selected
    L = bank.num_tokens
    from kvmem.integrations.hf.compat import cache_kwarg

    cache = transformers.DynamicCache(config=m.config)
    ck = {cache_kwarg(m): cache}
    with torch.inference_mode():
        m(input_ids=P[:, :S], use_cache=True, **ck)
        pos = torch.arange(S, S + L)[None]
        cos, sin = m.model.rotary_emb(torch.zeros(1, L, 96), pos)
        for layer in bank.layers:
            k = bank.keys[layer].reshape(L, 2, 16).transpose(0, 1)[None]  # [1, Hkv, L, D]
            v = bank.values[layer].reshape(L, 2, 16).transpose(0, 1)[None]
            k_rot, _ = apply_rotary_pos_emb(k, k, cos, sin)
            cache.update(k_rot, v, layer)
        ids, logits = P[:, S:], []
        pos0 = S + L
        for step in range(new):
            o = m(input_ids=ids, use_cache=True, **ck,
                  position_ids=torch.arange(pos0, pos0 + ids.shape[1])[None])
            logits.append(o.logits[:, -1])
            pos0 += ids.shape[1]
            ids = o.logits[:, -1:].argmax(-1)
            assert ids.item() == out.sequences[0, 45 + step].item(), step
    for a, b in zip(out.logits, logits):
        assert rel_err(a, b) < LOGIT_RTOL


# ------------------------------------------------------------------------------ files
def test_save_load_round_trip_is_bit_identical(tmp_path):
    m = tiny_llama(seed=3)
    bank = build_bank(m, [doc(100, 5)])
    path = tmp_path / "docs.kvbank"
    bank.save(path)
    again = kvmem.MemoryBank.load(path)
    assert again.meta == json.loads(json.dumps(bank.meta))
    for layer in bank.layers:
        for part in ("keys", "values", "summaries"):
            assert torch.equal(getattr(bank, part)[layer], getattr(again, part)[layer])
    g = dict(input_ids=prompt(40, seed=9), max_new_tokens=5)
    a, _ = attached_generate(m, [bank], **g)
    b, _ = attached_generate(m, [again], **g)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bank_attached_in_a_new_process_gives_the_same_greedy_output(tmp_path):
    m = tiny_llama(seed=3)
    bank = build_bank(m, [doc(100, 5)])
    bank.save(tmp_path / "b.kvbank")
    here, _ = attached_generate(m, [bank], input_ids=prompt(40, seed=9), max_new_tokens=6)
    script = (
        "import sys, torch, kvmem; sys.path.insert(0, %r)\n"
        "from test_hf_memory import tiny_llama, gen, prompt\n"
        "from test_memory_banks import cfg\n"
        "m = tiny_llama(seed=3)\n"
        "kvmem.patch(m, memory_bank=cfg(), banks=[kvmem.MemoryBank.load(%r)])\n"
        "print(gen(m, input_ids=prompt(40, seed=9), max_new_tokens=6).sequences[0].tolist())\n"
    ) % (HERE, str(tmp_path / "b.kvbank"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == here.sequences[0].tolist()


# ------------------------------------------------------------------------------ combining
@pytest.mark.parametrize("top_k", [32, 3])
def test_combined_banks_equal_one_bank_holding_both(top_k):
    """[a, b] attached = concat([a, b]) attached, and the call's own evicted blocks compete too
    (a 200-token prompt with a 64-token window evicts some)."""
    m = tiny_llama(seed=5)
    a, b = build_bank(m, [doc(70, 1)]), build_bank(m, [doc(50, 2), doc(20, 3)])
    both = kvmem.MemoryBank.concat([a, b])
    assert both.num_blocks == a.num_blocks + b.num_blocks and len(both.meta["documents"]) == 3
    c = cfg(window=64, top_k=top_k)
    g = dict(input_ids=prompt(200, seed=14), max_new_tokens=8)
    x, rx = attached_generate(m, [a, b], config=c, **g)
    y, ry = attached_generate(m, [both], config=c, **g)
    assert torch.equal(x.sequences, y.sequences)
    assert all(torch.equal(p, q) for p, q in zip(x.logits, y.logits))
    assert rx.selected_pages(1) == ry.selected_pages(1)
    if top_k == 3:  # a pruning top_k: the attached and own blocks really compete
        none, _ = attached_generate(m, [], config=c, **g)
        assert not torch.equal(none.sequences, x.sequences) or not all(
            torch.equal(p, q) for p, q in zip(none.logits, x.logits))


def test_ragged_batch_with_an_attached_bank_equals_rows_alone():
    m = tiny_llama(seed=6)
    bank = build_bank(m, [doc(80, 4)])
    c = cfg(window=64, top_k=4)
    a, b = prompt(150, seed=21)[0], prompt(90, seed=22)[0]
    ids = torch.zeros(2, 150, dtype=torch.long)
    mask = torch.zeros(2, 150, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 60:], mask[1, 60:] = b, 1
    batch, _ = attached_generate(m, [bank], config=c, input_ids=ids, attention_mask=mask, max_new_tokens=8)
    for row, p in ((0, a), (1, b)):
        alone, _ = attached_generate(m, [bank], config=c, input_ids=p[None], max_new_tokens=8)
        assert torch.equal(batch.sequences[row, 150:], alone.sequences[0, len(p):])


def test_set_banks_swaps_and_detaches_without_repatching():
    m = tiny_llama(seed=3)
    bank = build_bank(m, [doc(100, 5)])
    g = dict(input_ids=prompt(40, seed=9), max_new_tokens=5)
    with_bank, _ = attached_generate(m, [bank], **g)
    without, _ = attached_generate(m, [], **g)
    patch(m, memory_bank=cfg())
    try:
        kvmem.set_banks(m, [bank])
        assert torch.equal(gen(m, **g).sequences, with_bank.sequences)
        with pytest.raises(TypeError, match="'banks' must be a list of kvmem.MemoryBank, got MemoryBank"):
            kvmem.set_banks(m, bank)
        assert patch(m, memory_bank=cfg(), banks=[bank]) is m  # what it holds now: a no-op
        with pytest.raises(ValueError, match="already patched with other memory_bank"):
            patch(m, memory_bank=kvmem.MemoryConfig(mode="extend", sink_tokens=16, window=64, block_size=16, top_k=1),
                  banks=[bank])
        assert torch.equal(gen(m, **g).sequences, with_bank.sequences)  # unchanged
        kvmem.set_banks(m, [])
        assert torch.equal(gen(m, **g).sequences, without.sequences)
    finally:
        unpatch(m)
    assert not torch.equal(with_bank.sequences, without.sequences)


# ------------------------------------------------------------------------------ bad input
def test_incompatible_banks_are_named_errors_and_change_nothing():
    m = tiny_llama(seed=3)
    bank = build_bank(m, [doc(60, 5)])

    def rejected(model, exc, match, **kw):
        with pytest.raises(exc, match=match):
            patch(model, **kw)
        assert not is_patched(model) and not hasattr(model, "_kvmem_options")

    rejected(tiny_llama(seed=99), ValueError, "another model: the weights", memory_bank=cfg(), banks=[bank])
    rejected(tiny_llama(seed=3).to(torch.bfloat16), ValueError, "model dtype 'torch.float32'", memory_bank=cfg(),
             banks=[bank])
    rejected(tiny_llama(seed=3, rope_theta=500.0), ValueError, "RoPE type and parameters", memory_bank=cfg(),
             banks=[bank])
    rejected(m, ValueError, "layers \\[0, 1\\].*memory layers are \\[1\\]", memory_bank=cfg(dense_layers=1),
             banks=[bank])
    rejected(m, ValueError, "pre-RoPE \\(extend mode\\) keys cannot be attached in exact mode",
             memory_bank=cfg(mode="exact"), banks=[bank])
    post = kvmem.MemoryBank(bank.keys, bank.values, bank.summaries,
                            dict(bank.meta, identity=dict(bank.identity, keys="post")))
    rejected(m, ValueError, "post-RoPE \\(exact mode\\) keys cannot be attached in extend mode", memory_bank=cfg(),
             banks=[post])
    rejected(m, TypeError, "'banks' must be a list of kvmem.MemoryBank, got MemoryBank", memory_bank=cfg(), banks=bank)
    rejected(m, TypeError, "'banks'\\[1\\] must be a kvmem.MemoryBank, got str", memory_bank=cfg(),
             banks=[bank, "x"])
    rejected(m, ValueError, "'banks' needs memory_bank", banks=[bank])
    rejected(m, ValueError, "float8 KV cache", memory_bank=cfg(), banks=[bank], kv_cache_dtype="fp8_e4m3")
    patch(m, memory_bank=cfg(mode="exact", top_k=8))
    try:
        with pytest.raises(ValueError, match="pre-RoPE keys.*mode='extend'"):
            kvmem.MemoryBank.from_documents(m, [doc(40, 1)], progress=False)
        with pytest.raises(ValueError, match="extend mode\\) keys cannot be attached in exact mode"):
            kvmem.set_banks(m, [bank])
        assert m._kvmem_options.memory_bank.attached == ()
    finally:
        unpatch(m)
    with pytest.raises(ValueError, match="must be patched"):
        kvmem.MemoryBank.from_documents(m, [doc(40, 1)], progress=False)
    with pytest.raises(ValueError, match="concat: the banks differ in block_size"):
        other = build_bank(m, [doc(64, 1)], config=cfg(block_size=32, sink_tokens=32, window=128, top_k=8))
        kvmem.MemoryBank.concat([bank, other])
    patch(m, memory_bank=cfg())
    try:
        with pytest.raises(TypeError, match="documents\\[0\\] is a text: pass tokenizer="):
            kvmem.MemoryBank.from_documents(m, ["some text"], progress=False)
        with pytest.raises(ValueError, match="'prefix' must be at most sink_tokens=16"):
            kvmem.MemoryBank.from_documents(m, [doc(40, 1)], prefix=list(range(1, 18)), progress=False)
        with pytest.raises(ValueError, match="documents\\[1\\] is empty"):
            kvmem.MemoryBank.from_documents(m, [doc(40, 1), []], progress=False)
    finally:
        unpatch(m)


def test_bad_files_are_named_errors_and_saving_is_atomic(tmp_path, monkeypatch):
    m = tiny_llama(seed=3)
    bank = build_bank(m, [doc(60, 5)])
    path = tmp_path / "b.kvbank"
    bank.save(path)
    good = path.read_bytes()
    with pytest.raises(IsADirectoryError, match="'path' must be a file path"):
        bank.save(tmp_path)
    with pytest.raises(IsADirectoryError):
        kvmem.MemoryBank.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no file"):
        kvmem.MemoryBank.load(tmp_path / "missing.kvbank")
    with pytest.raises(FileNotFoundError, match="existing directory"):
        bank.save(tmp_path / "no" / "b.kvbank")
    # truncated
    (tmp_path / "t.kvbank").write_bytes(good[: len(good) // 2])
    with pytest.raises(BankFileError, match="truncated or corrupted"):
        kvmem.MemoryBank.load(tmp_path / "t.kvbank")
    # a flipped byte in the tensor data (safetensors framing intact): the sha256 catches it
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    (tmp_path / "c.kvbank").write_bytes(bytes(bad))
    with pytest.raises(BankFileError, match="is corrupted"):
        kvmem.MemoryBank.load(tmp_path / "c.kvbank")
    # corrupted JSON inside the header metadata (same length: the framing stays valid)
    i = good.index(b'"format_version')
    hdr = bytearray(good)
    hdr[i + 1:i + 7] = b'{{{{{{'
    (tmp_path / "j.kvbank").write_bytes(bytes(hdr))
    with pytest.raises(BankFileError):
        kvmem.MemoryBank.load(tmp_path / "j.kvbank")
    # a safetensors file that is not a bank
    from safetensors.torch import save_file
    save_file({"x": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(BankFileError, match="not a kvmem memory bank"):
        kvmem.MemoryBank.load(tmp_path / "x.safetensors")
    # an interrupted save over an existing bank leaves it intact, no temporary file behind
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    other = build_bank(m, [doc(90, 6)])
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    other.save(path)  # a completed save replaces it
    assert kvmem.MemoryBank.load(path).num_blocks == other.num_blocks
    # permissions: a new bank gets what open() would give it (0666 less the umask), not mkstemp's
    # 0600; a save over a bank keeps that file's own
    mask = os.umask(0o022)
    try:
        bank.save(tmp_path / "new.kvbank")
        assert (tmp_path / "new.kvbank").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
    path.chmod(0o640)
    bank.save(path)
    assert path.stat().st_mode & 0o777 == 0o640
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: the check is os.access's answer
        import kvmem.memory.bankfile as bankfile

        monkeypatch.setattr(bankfile.os, "access", lambda p, mode: False)
    with pytest.raises(PermissionError, match="writable directory"):
        bank.save(ro / "b.kvbank")
    monkeypatch.undo()
    assert not os.listdir(ro)


# ------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smol():
    pkg_dir, kw = smollm2_files()
    model = transformers.AutoModelForCausalLM.from_pretrained(pkg_dir, dtype=torch.float32, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(pkg_dir, **kw)
    return model, tok


DOC_SEEDS = (1,)  # a tuning seed (0-9)


def test_smollm2_document_passkey_asked_without_the_document(smol):
    """A ~3k-token document with a pass key goes into a bank; a new call whose short prompt
    (intro + question, no document) asks for the key answers it."""
    from kvmem.bench import passkey

    m, tok = smol
    text, _ = passkey.haystack_text()
    hay = tok.encode(text, add_special_tokens=False)
    config = kvmem.MemoryConfig(mode="extend", window=512, top_k=64, chunk_size=256)
    for seed in DOC_SEEDS:
        trial = passkey.build_document_trial(tok, hay, 3000, seed)
        patch(m, memory_bank=config)
        try:
            bank = kvmem.MemoryBank.from_documents(m, [trial.document], progress=False)
            kvmem.set_banks(m, [bank])
            ids = torch.tensor([trial.input_ids])
            out = gen(m, input_ids=ids, max_new_tokens=8, pad_token_id=tok.eos_token_id,
                      return_dict_in_generate=False, output_logits=False)
        finally:
            unpatch(m)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert passkey.is_correct(answer, trial.key), (seed, answer, trial.key)


def test_a_prompt_inside_the_sinks_logs_that_it_cannot_retrieve(caplog):
    m = tiny_llama(seed=3)
    bank = build_bank(m, [doc(60, 5)])
    with caplog.at_level("WARNING", logger="kvmem"):
        attached_generate(m, [bank], input_ids=prompt(S, seed=9), max_new_tokens=2)
    assert sum("cannot retrieve from the attached memory banks" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvmem"):
        attached_generate(m, [bank], input_ids=prompt(S + 1, seed=9), max_new_tokens=2)
    assert not caplog.records
