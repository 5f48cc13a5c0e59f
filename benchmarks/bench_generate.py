"""End-to-end generate(): Hugging Face default (sdpa + DynamicCache) vs kvmem (PagedKVCache).

The same as ``python -m kvmem.bench generate`` (see :mod:`kvmem.bench.generate`). Not a test.

    python benchmarks/bench_generate.py                      # CPU: SmolLM2, 1k and 4k prompts
    python benchmarks/bench_generate.py --prompts 512 --new-tokens 32 --batch 1 4
    python benchmarks/bench_generate.py --device cuda --model random:llama3-8b --prompts 8192 32768 \\
        --batch 1 8 --new-tokens 256
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvmem.bench.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + (["--out", os.path.join(HERE, "results")] if "--out" not in sys.argv else [])))
