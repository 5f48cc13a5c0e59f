"""CPU speed A/B of two kvmem trees: alternating process pairs of bench_paged_attention.py.

Each pair runs this tree's ``benchmarks/bench_paged_attention.py`` once against each tree (``cwd``
and ``PYTHONPATH`` = the tree, so ``import kvmem`` and its compiled ``kvmem/_C*.so`` come from it;
the child's ``kvmem.__file__`` is checked), in an order that alternates from pair to pair. Cases:
decode B=8 ctx 4096 and prefill B=1 ctx 2048 (32/8 heads, d=128, page 16, fp32), kvmem only.
Prints every sample, the median per side and case, and new / old (the bar: at most 1.03).

    python benchmarks/ab_cpu.py --old /work/baseline [--new .] [--pairs 8] [--rounds 3] [--reps 3]
                                [--threads N]

The machine is noisy: run it with as little else running as possible, and read the raw numbers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "bench_paged_attention.py")
CASES = ["decode-B8-ctx4096", "prefill-B1-ctx2048"]
BAR = 1.03


def run_once(tree: str, rounds: int, reps: int, python: str, threads: int | None = None) -> dict:
    """One bench process against ``tree``.

    Returns
    -------
    dict
        case name -> median ms of kvmem over the process's rounds.
    """
    tree = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=tree)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    check = subprocess.run([python, "-c", "import kvmem, kvmem._C; print(kvmem.__file__)"], cwd=tree,
                           env=env, capture_output=True, text=True, check=True)
    where = check.stdout.strip()
    if not where.startswith(tree + os.sep):
        raise SystemExit(f"ab_cpu: kvmem imported from {where}, not from {tree}")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([python, BENCH, "--device", "cpu", "--dtype", "float32", "--block-size", "16",
                        "--only", ",".join(CASES), "--no-sdpa", "--rounds", str(rounds), "--reps", str(reps),
                        "--out", out], cwd=tree, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        (path,) = glob.glob(os.path.join(out, "*.json"))
        with open(path) as f:
            rows = json.load(f)["rows"]
    return {f"{r['case']}-B{r['batch']}-ctx{r['ctx']}": r["ms"] for r in rows if r["impl"].startswith("kvmem")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the baseline tree (its kvmem/_C*.so built in place)")
    p.add_argument("--new", default=os.path.dirname(HERE), help="the tree under test (default: this one)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="bench rounds per process")
    p.add_argument("--reps", type=int, default=3, help="calls per timing sample")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the bench processes (default: inherited); 1 is the steadiest "
                        "on a shared machine, but runs no key splits")
    a = p.parse_args(argv)
    trees = {"old": a.old, "new": a.new}
    samples = {side: {c: [] for c in CASES} for side in trees}
    for i in range(a.pairs):
        order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
        for side in order:
            ms = run_once(trees[side], a.rounds, a.reps, a.python, a.threads)
            for c in CASES:
                samples[side][c].append(ms[c])
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(f"pair {i + 1}/{a.pairs} {side}: " + "  ".join(f"{c} {ms[c]:.2f} ms" for c in CASES)
                  + f"  (load {load:.2f})", flush=True)
    ok = True
    for c in CASES:
        old, new = statistics.median(samples["old"][c]), statistics.median(samples["new"][c])
        ratio = new / old
        ok &= ratio <= BAR
        print(f"{c}: old median {old:.2f} ms, new median {new:.2f} ms, new/old {ratio:.3f} "
              f"({'ok' if ratio <= BAR else 'SLOWER than'} the {BAR:.2f} bar)")
        print(f"  old: {' '.join(f'{x:.2f}' for x in samples['old'][c])}")
        print(f"  new: {' '.join(f'{x:.2f}' for x in samples['new'][c])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
