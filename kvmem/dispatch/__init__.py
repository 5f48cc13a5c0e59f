"""The dispatcher: capability records, backends, ``select()``, ``explain()``, ``KVMEM_BACKEND``.

Each backend's capabilities per op are data (:class:`Capability`, registered by the op folders
under ``kvmem/ops/<op>/``); the dispatcher tries the backends fastest first — cuda, triton, cpu,
reference — and runs the first that accepts the call. ``KVMEM_BACKEND=cuda|triton|cpu|reference``
forces one (an error if it cannot run the call). :func:`explain` says, for a call, why each
backend was taken or rejected.

A rejection is either *inapplicable* (wrong device, not built, not installed: silent) or a
*fallback* (the backend runs on this device but not this feature/shape: logged once per reason, as one line on the ``kvmem`` logger).

This package imports no op: the op folders register into it when ``kvmem.ops`` is imported.
"""

from kvmem.dispatch.backends import (BACKENDS, BY_NAME, Backend, CompiledBackend, CpuBackend, CudaBackend,
                                     ReferenceBackend, TritonBackend, forced)
from kvmem.dispatch.call import Call, aligned_16, describe
from kvmem.dispatch.capability import SAME_AS_DTYPE, Capability, Rejection, capabilities, capability, register
from kvmem.dispatch.select import _logged, _select, explain, logger, select

__all__ = ["Backend", "CompiledBackend", "CpuBackend", "CudaBackend", "ReferenceBackend", "TritonBackend",
           "Call", "aligned_16", "describe", "SAME_AS_DTYPE", "Capability", "Rejection", "capabilities",
           "capability", "register", "BACKENDS", "BY_NAME", "explain", "forced", "logger", "select"]
