"""Prefill of a long prompt: kvmem memory mode (extend defaults) against HF full attention (CPU).

SmolLM2-135M-Instruct real weights, fp32; the prompt is the passkey benchmark's (natural-text
haystack, ``kvmem.bench.passkey.build_trial``, seed 0) of ``--length`` tokens. Each method runs in a
fresh subprocess (so peaks do not mix): one ``generate(max_new_tokens=1)`` -- the prefill and
the first token -- timed by wall clock; peak memory = the process's peak RSS during the call
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the model is loaded) minus its RSS
before the call. The KV held at the end is reported too (kvmem: the cache's pages; HF: its
``DynamicCache`` tensors).

    python benchmarks/memory_prefill.py --length 32768          # hf and extend, one JSON each
    python benchmarks/memory_prefill.py --length 8192 --methods extend hf paged

Resumable: ``<out>/prefill_<method>_<length>.json`` is skipped when it exists.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(HERE, "results", "memory_prefill")


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _kv_bytes(out_cache):
    held = getattr(out_cache, "kv_bytes_held", None)
    if callable(held):
        return int(held())
    total = 0
    for layer in getattr(out_cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def one(method, length, threads):
    """Run in the subprocess: load, configure, one timed generate; print a JSON line."""
    import torch

    sys.path.insert(0, HERE)
    import passkey as bench  # benchmarks/passkey.py: the model loader and the method configurations
    from kvmem.bench import passkey
    from kvmem.integrations.hf.compat import output_cache

    if threads:
        torch.set_num_threads(threads)
    pinned = json.load(open(os.path.join(HERE, "results", "passkey", "haystack.json")))
    text, _ = passkey.haystack_text(pinned)
    model, tok = bench.load_model()
    hay = tok.encode(text, add_special_tokens=False)
    model = bench.configure(model, method)
    trial = passkey.build_trial(tok, hay, length, 0)
    ids = torch.tensor([trial.input_ids])
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                             pad_token_id=tok.eos_token_id, return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(json.dumps({"method": method, "length": len(trial.input_ids), "target_length": length, "seconds": seconds,
                      "peak_rss_delta_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
                      "kv_bytes": _kv_bytes(output_cache(out)), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--methods", nargs="+", default=["extend", "hf"], choices=["extend", "hf", "paged", "streaming"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default torch's)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        one(a.one[0], int(a.one[1]), a.threads)
        return
    os.makedirs(a.out, exist_ok=True)
    for method in a.methods:
        path = os.path.join(a.out, f"prefill_{method}_{a.length}.json")
        if os.path.exists(path):
            print(f"{path} exists: skipped", flush=True)
            continue
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", method, str(a.length),
                               "--threads", str(a.threads)], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(lines[-1])
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(r, f, indent=1)
        os.replace(tmp, path)
        print(f"{method:>8} {r['length']:>6} tokens: {r['seconds']:8.1f} s, peak +{r['peak_rss_delta_mib']:.0f} MiB, "
              f"KV {r['kv_bytes'] / 2**20:.0f} MiB ({r['threads']} threads)", flush=True)


if __name__ == "__main__":
    main()
