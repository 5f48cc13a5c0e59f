"""The ``kvmem::*`` and ``kvmem_C::*`` op schemas, diffed against the committed ``schemas.txt``.

Flattening a parameter object at the ``torch.library`` boundary is where silent breakage happens
(an argument reordered, a default lost): any change to a schema must be a deliberate edit of
``tests/schemas.txt``.
"""

import os

import pytest
import torch

import kvmem  # noqa: F401  (registers kvmem::*)
from kvmem import _ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _schemas(prefix):
    return sorted(str(s) for s in torch._C._jit_get_all_schemas() if str(s).startswith(prefix))


def _committed(prefix):
    with open(os.path.join(HERE, "schemas.txt")) as f:
        return sorted(line.strip() for line in f if line.startswith(prefix))


def test_kvmem_schemas_unchanged():
    assert _schemas("kvmem::") == _committed("kvmem::")


def test_kvmem_C_schemas_unchanged():
    if _ext.load_error() is not None:
        pytest.skip("kvmem._C not built")
    assert _schemas("kvmem_C::") == _committed("kvmem_C::")
