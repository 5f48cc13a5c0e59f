"""``python -m kvmem.bench {decode,prefill,generate,memory} [options]`` (see :mod:`kvmem.bench.harness`)."""

import sys

from kvmem.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
