"""kvmem's ops: public, validated entry points over ``torch.ops.kvmem.*`` custom ops.

One folder per op (``kvmem/ops/<op>/``: public wrapper and custom op, ``params``, ``validate``,
``reference``, ``capabilities``, ``triton``); importing it registers its capability records with
``kvmem.dispatch``. ``kvmem.ops.spec`` holds the semantics as one text and ``kvmem.ops.reference``
the executable specification every backend is tested against.

A new op is one folder ``kvmem/ops/<op>/`` holding

* ``__init__.py``: the public function ``<op>`` and the custom op ``kvmem::<op>`` (its body:
  ``dispatch.select(params.call()).run("<op>", params)``) with a fake that ``torch._check``'s shapes;
* ``params.py``: the parameter object (``to_schema``/``from_schema``), ``FEATURE_OF`` (each optional
  argument's feature name), ``MODIFIER_OF``, ``COMMON``, and ``@dispatch.describe("<op>")``;
* ``validate.py``, ``reference.py`` and ``capabilities.py`` (one ``dispatch.Capability`` per backend,
  registered at import); optionally ``triton.py`` (with ``aot_variants`` and ``AOT_KERNELS``);

plus its name in ``OP_NAMES`` below and one line in ``kvmem/ops/reference.py``.

An op built from another op's kernels (``memory_attention``: compacted tables + ``paged_attention``
on the same backend) derives its records from that op's (``dataclasses.replace`` of its
``Capability``, ``kernels_of`` naming it: availability and build facts are that op's). A backend
without an implementation has no record (it then rejects the op's calls as inapplicable).
"""

import importlib

OP_NAMES = ("cache_write", "paged_attention", "merge_states", "memory_select", "memory_attention")  # the op registry: one name per op folder

for _name in OP_NAMES:  # the public function of each op folder, as kvmem.ops.<op>
    globals()[_name] = getattr(importlib.import_module(f"kvmem.ops.{_name}"), _name)
del _name

from kvmem.ops import reference  # noqa: E402
from kvmem.ops.cascade import cascade_decode  # noqa: E402  (a composite of paged_attention + merge_states)

__all__ = list(OP_NAMES) + ["reference", "OP_NAMES", "cascade_decode"]
