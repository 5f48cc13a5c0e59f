#!/usr/bin/env python
"""Merge a GPU run's verified record into the committed one.

    python tools/merge_verified.py OUT/verified.json [--into kvmem/verified/cuda.json]

``OUT/verified.json`` is what ``benchmarks/gpu_check.sh`` (the gpu tests of tests/ops) writes: the format
of kvmem/verified/cuda.json holding the record of the GPU architecture it ran on. Each arch in it
replaces that arch's record in the committed file (a fresh run supersedes an older one); other
archs are kept. Then commit the file:

    git add kvmem/verified/cuda.json && git commit -m "verified: <gpu>" -- kvmem/verified/cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", help="verified.json written by benchmarks/gpu_check.sh")
    ap.add_argument("--into", default=os.path.join(REPO, "kvmem", "verified", "cuda.json"))
    args = ap.parse_args(argv)
    from kvmem import verified

    try:
        archs = verified.merge_files(args.into, args.new)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        print(f"merge_verified: {e}", file=sys.stderr)
        return 1
    recs = verified.load_records(args.into)
    for arch in archs:
        r = recs[arch]
        print(f"{arch}: {len(r['passed'])} verified entries ({r.get('gpu')}, driver {r.get('driver')}, "
              f"torch {r.get('torch')}, triton {r.get('triton')}, {r.get('date')}) -> {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
