"""kvmem's ops: public, validated entry points over ``torch.ops.kvmem.*`` custom ops.

One folder per op (``kvmem/ops/<op>/``: public wrapper and custom op, ``params``, ``validate``,
``reference``, ``capabilities``, ``triton``); importing it registers its capability records with
``kvmem.dispatch``. ``kvmem.ops.spec`` holds the semantics as one text and ``kvmem.ops.reference``
the executable specification every backend is tested against.
"""

import importlib

OP_NAMES = ("cache_write", "paged_attention", "merge_states")  # the op registry: one name per op folder

for _name in OP_NAMES:  # the public function of each op folder, as kvmem.ops.<op>
    globals()[_name] = getattr(importlib.import_module(f"kvmem.ops.{_name}"), _name)
del _name

from kvmem.ops import reference  # noqa: E402

__all__ = list(OP_NAMES) + ["reference", "OP_NAMES"]
